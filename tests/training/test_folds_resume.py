"""A K-fold driver killed mid-run and the same command again, through the CLI: in a module of its own, so that no
other Ray runs beside it and its console is what a user sees."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from console import folded_lines, noise
from test_folds import STAGES, cfg

from planet_batch.cluster.runtime import FAULT_DIR_ENV, fault_file
from planet_batch.config import to_dict
from planet_batch.data.datasets import labelled_split
from planet_batch.export import load_model

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_an_interrupted_k_fold_run_keeps_its_finished_fold_and_resumes_the_others_mid_stage(demo_root, tmp_path):
    """3 folds two at a time: one hangs in its second epoch, the other finishes and the third starts; the driver is
    killed. The same command keeps the finished fold and resumes both others from their checkpoints."""
    config, run, faults = tmp_path / "three.yaml", tmp_path / "run", tmp_path / "faults"
    stages = [{**STAGES[0], "epochs": 3}]
    config.write_text(json.dumps({**to_dict(cfg()), "stages": stages}))
    faults.mkdir()
    fault_file(faults, "train:s:1:report:0", "hang").touch()  # the first fold to reach epoch 1's report stops there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {FAULT_DIR_ENV: str(faults)}
    argv = [sys.executable, "jobs/train.py", "--config", str(config), "--data", str(demo_root), "--out", str(run),
            "--folds", "3", "--parallel-folds", "2"]
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    # The third fold's second epoch row: its first epoch's checkpoint is registered by then.
    while not any(re.search(r"fold-2 +1 +\d", ln) for ln in lines):
        assert first.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        lines.append(first.stdout.readline())
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    finished = {m[1] for ln in lines if (m := re.search(r"(fold-\d): final: F2", ln))}
    assert len(finished) == 1, "".join(lines)[-3000:]
    kept_export = run / finished.pop() / "export" / "model.pt"
    kept = kept_export.stat().st_mtime_ns

    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count("finished by an earlier run, export kept") == 1 and kept_export.stat().st_mtime_ns == kept
    resumed = dict(re.findall(r"(fold-\d): resuming s at epoch (\d)", out))
    assert len(resumed) == 2 and "1" in resumed.values(), out[-3000:]  # the hung fold goes on at its epoch 1
    # The console, two folds side by side: their rows arrive together and look alike to Ray's log deduplication
    # (which drops every word with a digit); each fold epoch the rerun trained still gets its own line.
    lines = out.splitlines()
    bad = [i for i, line in enumerate(lines) if line in noise(lines) + folded_lines(lines)]
    assert not bad, "\n".join(ln for i in bad for ln in lines[max(0, i - 3):i + 25])  # each with what follows
    rows = sorted(tuple(line.split(": ")[-1].split()[:2]) for line in lines
                  if re.match(r"^fold-\d\s+\d+\s+\d\.\d{6}\s", line.split(": ")[-1]))
    assert rows == sorted((f, str(e)) for f, start in resumed.items() for e in range(int(start), 3)), out[-3000:]
    assert any("3 folds of 80 labelled images (" in line and ", 2 at a time" in line for line in lines)
    assert any("out of fold: F2" in line for line in lines) and f"export: {run / 'export'}" in lines
    for i in range(3):
        assert pd.read_csv(run / f"fold-{i}" / "metrics.csv")["epoch"].tolist() == [0, 1, 2]
    oof = pq.read_table(run / "oof.parquet").to_pandas()
    assert sorted(oof["image_name"]) == sorted(labelled_split(demo_root).names)
    assert len(load_model(run / "export").members) == 3
