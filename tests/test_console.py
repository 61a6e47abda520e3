"""The console is for people: a short train and score, as a user runs them, print our lines and not Ray's."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"ERROR|\bE\b|Deprecat|Reporting training result|Progress bars disabled|Traceback")
# Ray's core worker logs this at ERROR for every actor whose constructor arguments are object references and
# that may restart (ray-project/ray#53727): Ray Data's own map actors and Ray Train's PreemptionWatcher pass
# theirs so, and no option of ours changes it. docs/console.md lists it with the reason.
# And Ray's GCS at the driver's exit, when a scoring actor's process is gone before its kill RPC arrives (seen in
# CI on a slower 2-core machine; docs/console.md).
RAY_INTERNAL = re.compile(r"core_worker\.cc:\d+: Actor with class name: '(PreemptionWatcher|MapWorker\(MapBatches"
                          r"\(Predictor\)\))' .* has constructor arguments in the object store and max_restarts > 0"
                          r"|\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: "
                          r"Invalid: KillActor RPC failed")


def run(*argv, tmp_env):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=tmp_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (proc.stdout + proc.stderr).splitlines()


def test_train_and_score_print_the_epoch_table_and_results_only(demo_root, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="pb-con-", dir="/tmp")  # short: Ray's socket paths must fit 108 bytes
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    stages = "[{name: s1, size: 32, epochs: 2, frozen: true, lr: 0.01}, {name: s2, size: 32, epochs: 1, " \
             "frozen: false, lr: [1.0e-5, 0.002]}]"
    try:
        train = run("jobs/train.py", "--config", "jobs/configs/demo.yaml", "--data", str(demo_root), "--out",
                    str(tmp_path / "run"), "--set", f"stages={stages}", "--set", "batch_size=16", tmp_env=env)
        score = run("jobs/score.py", "--model", str(tmp_path / "run" / "export"), "--data", str(demo_root), "--out",
                    str(tmp_path / "submission.csv"), tmp_env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    console = train + score
    noise = [line for line in console if NOISE.search(line) and not RAY_INTERNAL.search(line)]
    assert noise == [], "\n".join(noise)
    assert sum(line.startswith("epoch train_loss") for line in train) == 2  # one table header per stage
    assert sum(bool(re.search(r"\d worker\(s\): cpu, (bf16|fp32)$", line)) for line in train) == 1  # not per stage
    rows = [line for line in train if re.match(r"^\d+\s+\d\.\d{6}\s", line.split(": ")[-1])]
    assert len(rows) == 3, train
    assert any("final: F2" in line for line in train) and f"export: {tmp_path / 'run' / 'export'}" in train
    assert any("scored 40 images" in line for line in score)
    assert f"submission: {tmp_path / 'submission.csv'}" in score
    print(f"console: {len(train)} lines for train, {len(score)} for score")


def test_k_fold_training_prints_one_table_line_per_fold_epoch(demo_root, tmp_path):
    """Two folds side by side: their rows arrive together and look alike to Ray's log deduplication (which drops
    every word with a digit); each finished fold epoch still gets its own line, naming the fold."""
    ray_tmp = tempfile.mkdtemp(prefix="pb-con-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    try:
        train = run("jobs/train.py", "--config", "jobs/configs/demo.yaml", "--data", str(demo_root), "--out",
                    str(tmp_path / "run"), "--set", "stages=[{name: s, size: 32, epochs: 2, frozen: false, lr: 0.01}]",
                    "--set", "batch_size=8", "--folds", "2", "--workers", "1", "--cpus-per-worker", "0.5",
                    tmp_env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    noise = [line for line in train if (NOISE.search(line) and not RAY_INTERNAL.search(line)) or "repeated" in line
             or "worker processes have been started" in line or "available CPUs" in line]
    assert noise == [], "\n".join(noise)
    rows = sorted(tuple(line.split(": ")[-1].split()[:2]) for line in train
                  if re.match(r"^fold-\d\s+\d+\s+\d\.\d{6}\s", line.split(": ")[-1]))
    assert rows == [("fold-0", "0"), ("fold-0", "1"), ("fold-1", "0"), ("fold-1", "1")], train
    assert any("2 folds of 80 labelled images (40 held out each), 2 at a time" in line for line in train), train
    assert any("out of fold: F2" in line for line in train) and f"export: {tmp_path / 'run' / 'export'}" in train
