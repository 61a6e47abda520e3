"""bench/score_throughput.py at tiny sizes: what it compares must be the same work, so its ratios mean something."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_the_pipeline_it_times_writes_the_plain_loops_submission(tmp_path):
    argv = [sys.executable, "bench/score_throughput.py", "--n-images", "48", "--arch", "resnet18", "--size", "32",
            "--batch-size", "16", "--shard-rows", "16", "--modes", "fp32/off", "--forward-seconds", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as the bench is run
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_submission_as_plain_loop"], result  # one view each (score's TTA default is 8)
    assert result["forward_img_s"] > 0 and result["plain_loop_img_s"] > 0 and result["ray_end_to_end_img_s"] > 0
