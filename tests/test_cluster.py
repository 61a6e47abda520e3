"""Jobs on a real 2-node Ray cluster on 127.0.0.1, submitted through Ray's job API with token auth on.

No mocks of Ray: `ray start --head` and `ray start --address` run as child processes (each node
with 2 logical CPUs of this 2-core machine), and the fixture stops exactly those by process group.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from planet_batch.export import save_export
from planet_batch.labels import TAGS
from planet_batch.model import build_model
from planet_batch.submission import check_submission
from planet_batch.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log):
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="pb-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    # As in an activated virtualenv: the jobs' `python` is this test run's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    procs = []
    try:
        procs.append(start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={ray_tmp}"],
                           env, (tmp / "head.log").open("w")))
        url = f"http://127.0.0.1:{dash}"
        wait_for(lambda: http_status(f"{url}/api/version", token) == 200, 60, "the head's job API")
        procs.append(start([f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2"],
                           env, (tmp / "worker.log").open("w")))
        wait_for(lambda: alive_nodes(url, token) == 2, 60, "the second node")
        yield {"url": url, "token": token, "env": env, "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def http_status(url, token=None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def get_json(cluster, path):
    req = urllib.request.Request(cluster["url"] + path, headers={"Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def alive_nodes(url, token) -> int:
    try:
        data = get_json({"url": url, "token": token}, "/nodes?view=summary")["data"]["summary"]
    except (OSError, KeyError, ValueError):
        return 0
    return sum(1 for n in data if n.get("raylet", {}).get("state") == "ALIVE")


def wait_for(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


def client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["url"], headers={"Authorization": f"Bearer {cluster['token']}"})


def run_job(cluster, entrypoint, timeout=420):
    from ray.job_submission import JobStatus

    c = client(cluster)
    job = c.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
    end = time.time() + timeout
    while time.time() < end:
        status = c.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = c.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint} ended {status}:\n{logs[-4000:]}"
    return logs


def test_requests_without_the_token_are_refused(cluster):
    from ray.job_submission import JobSubmissionClient

    assert http_status(f"{cluster['url']}/api/jobs/") == 401
    assert http_status(f"{cluster['url']}/api/jobs/", "not-the-token") in (401, 403)
    assert http_status(f"{cluster['url']}/api/jobs/", cluster["token"]) == 200
    with pytest.raises(Exception, match="401|[Uu]nauthori[sz]ed|[Aa]uthenticat"):
        JobSubmissionClient(cluster["url"], headers={"Authorization": "Bearer wrong"}).list_jobs()


def test_score_job_on_the_cluster(cluster, demo_root, tmp_path):
    torch.manual_seed(0)
    export = save_export(tmp_path / "export", build_model("resnet18", len(TAGS)).state_dict(), arch="resnet18",
                         tags=TAGS, size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=0.2,
                         thresholds=np.full(len(TAGS), 0.2), dropout=0.5, config={}, metrics={})
    out = tmp_path / "submission.csv"
    logs = run_job(cluster, f"python jobs/score.py --model {export} --data {demo_root} --out {out} --batch-size 8")
    assert f"submission: {out}" in logs
    assert check_submission(out, demo_root / "sample_submission_v2.csv") == []


def test_train_job_spreads_workers_over_both_nodes(cluster, demo_root, tmp_path):
    run = tmp_path / "run"
    stages = '[{name: s1, size: 32, epochs: 1, frozen: true, lr: 0.01}]'
    logs = run_job(cluster, (
        f"python jobs/train.py --config jobs/configs/demo.yaml --data {demo_root} --out {run} "
        f"--set 'stages={stages}' --set batch_size=16 --set placement_strategy=STRICT_SPREAD"
    ))
    assert f"export: {run / 'export'}" in logs
    assert (run / "export" / "model.json").exists() and (run / "metrics.csv").exists()
    workers = get_json(cluster, "/api/v0/actors?detail=1&limit=1000&filter_keys=class_name"
                                "&filter_predicates=%3D&filter_values=RayTrainWorker")["data"]["result"]["result"]
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers
