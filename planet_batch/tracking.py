"""MLflow tracking: one run per training job (K folds: a parent with a nested run per fold) and per scoring job.

Ray Train v2 has no tracking callback (ray-project/ray#64179), so this follows Ray's advice to log from rank 0
and keep one run id: the driver opens the run before Ray starts (an unreachable server is one line, exit 2) and
keeps its id in the run folder (RUN_DIR/mlflow_run.json), so a resumed driver and a restarted worker group log
into the same run; rank 0 logs each epoch once Ray has registered its checkpoint, and only the steps the server
does not have yet, so an epoch repeated after a restart is never logged twice. The server is not the job: when
it stops answering, one warning, and the job goes on without it, writing everything locally as ever.

Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN); they
travel to the workers in memory only, and nothing here writes the URI or them into params, tags or files.
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from planet_batch.cluster.storage import write_atomic
from planet_batch.config import TrackingConfig
from planet_batch.errors import PlanetBatchError, first_line

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in a run folder: the MLflow run its training logs into
EPOCH_METRICS = ("train_loss", "valid_loss", "accuracy_thresh", "fbeta", "time")  # the epoch table's numbers

# MLflow's client retries a failed request 7 times with backoff factor 2 (minutes, against a server that is gone)
# and waits 120 s for an answer; a job's tracking gives up within seconds (2 retries, 1 s then 2 s) and then goes
# on without the server. MLflow prints "View run at <URL>" itself; the job prints a URL without credentials.
# A user's values stay.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingError(PlanetBatchError, RuntimeError):
    pass


def safe_uri(uri: str) -> str:
    """The tracking URI as it may be printed: without user, password or query."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname and parts.hostname + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=host or parts.netloc, query="", fragment="").geturl()


def reason(e: BaseException, uri: str) -> str:
    """One short line for why a call failed, with nothing of the URI that might carry credentials."""
    text = first_line(e)
    for secret in {uri, urllib.parse.urlsplit(uri).netloc} - {""}:
        text = text.replace(secret, safe_uri(uri) if secret == uri else "<server>")
    if status := re.search(r"error code (\d{3})", text):  # MLflow's "... failed with error code 403 != 200"
        return f"{status[1]} {http.HTTPStatus(int(status[1])).phrase}"
    known = next((k for k in ("Connection refused", "Name or service not known", "timed out") if k in text), None)
    return known or text[:200]


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """A config as MLflow params: `stages.1.lr` -> `[1e-05, 0.002]`."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out |= flat_params(v, f"{name}.{i}.")
        else:
            out[name] = str(value)
    return out


_warned: set[str] = set()  # the tracking URIs this process has warned about: one warning line per job


class Run:
    """One MLflow run. It travels to the Ray Train workers in their plan (pickled without its client); after the
    first call that fails, one warning and every later call is skipped."""

    def __init__(self, uri: str, run_id: str, env: dict[str, str]):
        self.uri, self.run_id, self.env = uri, run_id, env
        self.lost = False
        self._client = None
        self._logged_step: int | None = None  # the highest epoch step on the server, read once per process

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "env": self.env, "lost": self.lost}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["run_id"], state["env"])
        self.lost = state["lost"]

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.uri, self.env)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        if self.lost:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the server's problem is not the job's: whatever MLflow or requests raised
            self.lost = True
            if self.uri not in _warned:
                _warned.add(self.uri)
                log.warning("MLflow at %s stopped answering (%s while logging %s); the job goes on "
                            "without it, and its files have everything", safe_uri(self.uri), reason(e, self.uri),
                            what)
            return None

    def logged_step(self) -> int:
        """The highest epoch step the server has for this run (0: none)."""
        if self._logged_step is None:
            history = self._call("epochs", self.client.get_metric_history, self.run_id, EPOCH_METRICS[1])
            self._logged_step = max((m.step for m in history or ()), default=0)
        return self._logged_step

    def log_epochs(self, epochs: list[dict]) -> None:
        """Each epoch row of the table as metrics at its step (1, 2, ... across stages) with the stage's steps as
        a tag (`stage.NAME`: `3-5`), for the rows the server does not have yet."""
        from mlflow.entities import Metric, RunTag

        done = self.logged_step()
        new = [(step, row) for step, row in enumerate(epochs, 1) if step > done]
        if not new or self.lost:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, step) for step, row in new for k in EPOCH_METRICS if k in row]
        steps: dict[str, list[int]] = {}
        for step, row in enumerate(epochs, 1):
            steps.setdefault(row["stage"], []).append(step)
        tags = [RunTag(f"stage.{name}", f"{s[0]}-{s[-1]}") for name, s in steps.items()]
        tags += [RunTag(k, str(epochs[-1][k])) for k in ("precision", "compiled") if k in epochs[-1]]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._call("epochs", self.client.log_batch, self.run_id, metrics=metrics[i:i + 1000],
                       tags=tags if i == 0 else ())
        if not self.lost:
            self._logged_step = new[-1][0]

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("metrics", self.client.log_batch, self.run_id,
                   metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, files: Iterable[Path | str], folder: str | None = None) -> None:
        for f in map(Path, files):
            if f.is_file():
                self._call(f.name, self.client.log_artifact, self.run_id, str(f), folder)

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (a run whose driver was killed stays RUNNING; resuming it goes on)."""
        self._call("the run's end", self.client.set_terminated, self.run_id, status)

    def __repr__(self) -> str:  # (no URI: it may carry credentials)
        return f"Run({self.run_id})"


def mlflow_client(uri: str, env: dict[str, str]):
    for k, v in CLIENT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.update(env)  # (a worker's: the driver's MLflow settings)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry warnings, one per attempt
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass
class Tracker:
    """A checked connection to the tracking server and the experiment a job's runs go to."""

    uri: str
    experiment_id: str
    options: TrackingConfig
    env: dict[str, str]

    def open(self, name: str, *, params: dict[str, str], tags: dict[str, str], keep_in: Path | None = None,
             parent: Run | None = None) -> Run:
        """A new run, or the one whose id `keep_in` holds (a resumed training: running again, params kept).
        Failures here are one TrackingError line: the job has not started yet."""
        from mlflow.entities import Param

        client = mlflow_client(self.uri, self.env)
        try:
            run_id = self._kept_run(client, keep_in)
            if run_id is None:
                tags = tags | ({"mlflow.parentRunId": parent.run_id} if parent else {})
                run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
                params = list(params.items())
                for i in range(0, len(params), 100):  # MLflow's limit per batch
                    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params[i:i + 100]])
                if keep_in is not None:
                    write_atomic(keep_in / RUN_FILE, lambda p: p.write_text(json.dumps(
                        {"run_id": run_id, "experiment_id": self.experiment_id})))
            else:
                client.update_run(run_id, status="RUNNING")
        except Exception as e:
            raise TrackingError(f"tracking: MLflow at {safe_uri(self.uri)} refused the run ({reason(e, self.uri)})"
                                ) from None
        log.info("MLflow run %s (%s): %s", run_id, name, self.run_url(run_id))
        return Run(self.uri, run_id, self.env)

    def _kept_run(self, client, keep_in: Path | None) -> str | None:
        """The run id a run folder keeps, when that run is on this server in this experiment."""
        from mlflow.exceptions import MlflowException

        try:
            kept = json.loads((keep_in / RUN_FILE).read_text()) if keep_in else None
        except (OSError, ValueError):
            return None
        if not kept:
            return None
        try:
            run = client.get_run(kept["run_id"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.info("the run folder's MLflow run %s is not on this server; starting a new one",
                     kept["run_id"])
            return None
        return kept["run_id"] if run.info.experiment_id == self.experiment_id else None

    def run_url(self, run_id: str) -> str:
        """The run's page on an HTTP server; the store itself otherwise (a local ./mlruns, databricks)."""
        if not self.uri.startswith(("http://", "https://")):
            return safe_uri(self.uri)
        return f"{safe_uri(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


def mlflow_env() -> dict[str, str]:
    """MLflow's settings of this process (credentials among them), for the workers' clients."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI"}


def connect(cfg: TrackingConfig | None) -> Tracker | None:
    """The tracking server of `cfg` (or $MLFLOW_TRACKING_URI), checked, with its experiment (created when new);
    None when tracking is off. An unreachable or refusing server is one TrackingError line."""
    uri = cfg.uri if cfg else None
    if uri is None:
        return None
    env = mlflow_env()
    client = mlflow_client(uri, env)
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    except Exception as e:
        raise TrackingError(f"tracking: cannot use the MLflow server at {safe_uri(uri)} ({reason(e, uri)}); "
                            "unset MLFLOW_TRACKING_URI (or drop --tracking) to run without tracking") from None
    return Tracker(uri, experiment_id, cfg, env)


@contextlib.contextmanager
def tracked(run: Run | None) -> Iterator[Run | None]:
    """The job's work on `run` (None: no tracking): a block that ends with an exception finishes the run, KILLED
    after Ctrl-C or SIGTERM, else FAILED, and the exception goes on. The job finishes a run that succeeded itself,
    with what it logs at the end."""
    try:
        yield run
    except BaseException as e:
        if run is not None:
            run.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
