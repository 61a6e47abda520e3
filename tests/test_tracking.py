"""MLflow tracking against real tracking servers: a server that cannot be used stops the job before Ray, one that
goes away mid-run costs one warning line and nothing else. (The runs' contents are read back where they are
made: tests/training/test_train.py, test_folds.py.)"""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow_servers import MlflowServer, free_port

from planet_batch.cli import main
from planet_batch.cluster.runtime import FAULT_DIR_ENV, fault_file
from planet_batch.tracking import flat_params, reason, safe_uri

ROOT = Path(__file__).resolve().parents[1]
STAGES = [{"name": "only", "size": 32, "epochs": 5, "frozen": True, "lr": 0.01}]
ONE_WORKER = {"arch": "resnet18", "weights": "none", "batch_size": 16, "workers": 1, "cpus_per_worker": 0.5,
              "precision": "fp32", "stages": STAGES}


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MLFLOW_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "planet_batch.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_uris_and_errors_are_printed_without_credentials():
    uri = "https://bob:hunter2@mlflow.example.com:5000/prefix?token=abc"
    assert safe_uri(uri) == "https://mlflow.example.com:5000/prefix"
    assert safe_uri("databricks") == "databricks"
    error = OSError(f"API request to endpoint {uri}/api/2.0/mlflow/runs/create failed with error code 403 != 200")
    assert reason(error, uri) == "403 Forbidden"
    assert reason(OSError("Max retries exceeded with url /api (port 54017): Connection refused"), uri) == (
        "Connection refused")
    odd = RuntimeError("something at bob:hunter2@mlflow.example.com:5000 broke")
    assert "hunter2" not in reason(odd, uri)


def test_a_config_becomes_flat_params():
    assert flat_params({"arch": "resnet18", "stages": [{"name": "a", "lr": [1e-4, 2e-3]}], "storage": None}) == {
        "arch": "resnet18", "stages.0.name": "a", "stages.0.lr": "[0.0001, 0.002]", "storage": "None"}


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(403)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_cannot_be_used_is_one_line_before_any_work(demo_root, tmp_path, refusing_server, monkeypatch,
                                                                   capsys, no_ray):
    config = tmp_path / "one.yaml"
    config.write_text(json.dumps(ONE_WORKER))
    nobody = f"http://ci:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    cases = [
        (["train", "--config", str(config), "--data", str(demo_root), "--out", str(tmp_path / "run")],
         nobody, "Connection refused"),
        (["train", "--config", str(config), "--data", str(demo_root), "--out", str(tmp_path / "run"),
          "--tracking", refusing_server], None, "403 Forbidden"),
        (["score", "--model", str(tmp_path / "none"), "--data", str(demo_root), "--out", str(tmp_path / "s.csv")],
         nobody, "Connection refused"),
    ]
    for args, env_uri, why in cases:
        if env_uri:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"planet-batch {args[0]}: error: tracking: cannot use the MLflow server at "
                                   "http://127.0.0.1:") and why in lines[0], lines
        assert "hunter2" not in lines[0]
        assert not (tmp_path / "run").exists() and not (tmp_path / "s.csv").exists()  # nothing started


@pytest.mark.ray
def test_a_server_gone_mid_run_is_one_warning_and_the_job_finishes(demo_root, tmp_path):
    """The server killed while the run pauses in its third epoch: one warning line (from rank 0, which tells the
    driver in its next report), the job ends 0 with every file written, and the server kept the two epochs it had."""
    server = MlflowServer(tmp_path / "mlflow")
    config, run, faults = tmp_path / "one.yaml", tmp_path / "run", tmp_path / "faults"
    config.write_text(json.dumps(ONE_WORKER))
    faults.mkdir()
    point = "train:only:2:report:0"  # before epoch 2's report, rank 0 (epochs 0 and 1 logged)
    fault_file(faults, point, "pause").touch()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MLFLOW_")}
    job = subprocess.Popen([sys.executable, "jobs/train.py", "--config", str(config), "--data", str(demo_root),
                            "--out", str(run), "--tracking", server.uri],
                           cwd=ROOT, env=env | {FAULT_DIR_ENV: str(faults)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        paused, deadline = fault_file(faults, point, "paused"), time.monotonic() + 240
        while not paused.exists():
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its third epoch"
            time.sleep(0.2)
        (tracked,) = server.runs()
        assert [s for s, _ in server.points(tracked.info.run_id, "valid_loss")] == [1, 2]
        server.stop()
        paused.unlink()
        out = job.communicate(timeout=300)[0]
    finally:
        job.kill()
        server.stop()
    assert job.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if " WARNING " in line and "fault injection" not in line
                and "weights: none" not in line and "Token authentication" not in line]
    assert len(warnings) == 1 and "stopped answering" in warnings[0], warnings
    assert "Traceback" not in out and "Retrying" not in out
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert (run / "export" / "model.json").is_file() and (run / "losses.png").is_file()
