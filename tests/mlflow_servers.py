"""A real MLflow tracking server on 127.0.0.1 for the tests: a SQLite backend store and artifacts it serves itself
(clients upload them over HTTP, as they do to a server on a cluster's head)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).with_name("mlflow")
        self.log = (root / "server.log").open("w")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200
        except OSError:
            return False

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()

    def runs(self, experiment: str = "planet-batch", filter_string: str = "") -> list:
        """Every run of `experiment`, oldest first."""
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string, order_by=["attributes.start_time ASC"])

    def points(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client().get_metric_history(run_id, key)]

    def artifacts(self, run_id: str, folder: str | None = None) -> list[str]:
        return sorted(f.path for f in self.client().list_artifacts(run_id, folder))

    def stored_text(self) -> str:
        """Everything the server keeps (its database and artifact files), as text, to search for secrets."""
        data = b"".join(p.read_bytes() for p in self.root.rglob("*") if p.is_file() and p.name != "server.log")
        return data.decode("latin-1")
