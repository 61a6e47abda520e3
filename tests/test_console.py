"""The console is for people: a short train and score, as a user runs them, print our lines and not Ray's."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from console import noise

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]



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
    assert noise(console) == [], "\n".join(noise(console))
    assert sum(line.startswith("epoch train_loss") for line in train) == 2  # one table header per stage
    assert sum(bool(re.search(r"\d worker\(s\): cpu, (bf16|fp32)$", line)) for line in train) == 1  # not per stage
    rows = [line for line in train if re.match(r"^\d+\s+\d\.\d{6}\s", line.split(": ")[-1])]
    assert len(rows) == 3, train
    assert any("final: F2" in line for line in train) and f"export: {tmp_path / 'run' / 'export'}" in train
    assert any("scored 40 images" in line for line in score)
    assert f"submission: {tmp_path / 'submission.csv'}" in score
    print(f"console: {len(train)} lines for train, {len(score)} for score")
