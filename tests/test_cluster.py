"""Jobs on a real 2-node Ray cluster on 127.0.0.1, submitted through Ray's job API with token auth on.

No mocks of Ray: `ray start --head` and `ray start --address` run as child processes (each node
with 2 logical CPUs of this 2-core machine), and the fixture stops exactly those by process group.
"""

import contextlib
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
    # Each node's dashboard agent gets its own port: Ray's fixed default (52365) collides between nodes on one
    # machine, and a node without its agent cannot take jobs ("No available agent to submit job").
    return subprocess.Popen([RAY, "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc):
    """Stop a `ray start --block` and everything it started; a no-op when it is already gone."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def two_node_cluster(tmp: Path):
    """A head and a worker node on 127.0.0.1; yields what the tests need, stops both on exit."""
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
        yield {"url": url, "token": token, "env": env, "tmp": tmp, "worker": procs[1]}
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


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


def submit(jobs, entrypoint, timeout=90) -> str:
    """Submit with this checkout as the working dir; a new head's job agent can need a while to come up."""
    end = time.time() + timeout
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > end:
                raise
            time.sleep(2)


def run_job(cluster, entrypoint, timeout=420):
    from ray.job_submission import JobStatus

    c = client(cluster)
    job = submit(c, entrypoint)
    end = time.time() + timeout
    while time.time() < end:
        status = c.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = c.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint} ended {status}:\n{logs[-4000:]}"
    return logs


# First in the module: it runs its own cluster, before the shared one is started.
def test_losing_a_worker_node_mid_scoring_gives_a_whole_submission_or_a_loud_failure(demo_root, tmp_path):
    """Stop the worker node while the cluster scores: never a short or duplicated file."""
    from ray.job_submission import JobStatus

    from planet_batch.demo_data import write_demo_data

    # Long enough (~1.5 min) that the actors on the worker node, slow to start on 2 shared cores, get to work.
    data = write_demo_data(tmp_path / "data", n_train=4, n_test=1200, n_additional=300, seed=3)
    export = tiny_export(tmp_path / "export", size=96)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    with two_node_cluster(tmp_path) as c:
        jobs = client(c)
        job = submit(jobs, f"python jobs/score.py --model {export} --data {data} --out {out} --batch-size 16 --tta "
                           "--stall-timeout 30")
        ended = (JobStatus.SUCCEEDED, JobStatus.FAILED)
        # Actors on the worker node are sometimes still starting when the work is done (2 shared cores):
        # stop the node once scoring runs, whatever it holds then (actors, decode tasks, blocks).
        wait_for(lambda: len(predictors(c)) >= 2 or jobs.get_job_status(job) in ended, 150, "scoring actors")
        time.sleep(5)
        nodes = len({a["node_id"] for a in predictors(c)})
        assert jobs.get_job_status(job) not in ended, jobs.get_job_logs(job)[-3000:]
        stop(c["worker"])
        wait_for(lambda: jobs.get_job_status(job) in ended, 240, "the job's end")
        status, logs = jobs.get_job_status(job), jobs.get_job_logs(job)
    files = sorted(p.name for p in out.parent.iterdir())
    reasons = [line for line in logs.splitlines() if "score: error:" in line or line.startswith("ray.exceptions.")]
    # The outcome, for docs/reliability.md (visible with -s).
    print(f"after losing the worker node (actors on {nodes} nodes): {status}; {files}; {reasons}")
    if status == JobStatus.SUCCEEDED:
        assert check_submission(out, data / "sample_submission_v2.csv") == [], logs[-3000:]
    else:  # a loud failure: our stall error or Ray's own, and nothing written
        assert reasons, logs[-3000:]
        assert "submission.csv" not in files and not any(".tmp" in f for f in files), files


def test_requests_without_the_token_are_refused(cluster):
    from ray.job_submission import JobSubmissionClient

    assert http_status(f"{cluster['url']}/api/jobs/") == 401
    assert http_status(f"{cluster['url']}/api/jobs/", "not-the-token") in (401, 403)
    assert http_status(f"{cluster['url']}/api/jobs/", cluster["token"]) == 200
    with pytest.raises(Exception, match="401|[Uu]nauthori[sz]ed|[Aa]uthenticat"):
        JobSubmissionClient(cluster["url"], headers={"Authorization": "Bearer wrong"}).list_jobs()


def test_score_job_on_the_cluster(cluster, demo_root, tmp_path):
    export = tiny_export(tmp_path / "export")
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


def test_a_local_ray_keeps_its_dashboard_on_loopback_and_wants_the_token(tmp_path):
    """The local Ray that `ensure_ray()` starts (jobs run outside a cluster): job API on 127.0.0.1, token on."""
    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="pb-lo-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    code = ("import sys; from planet_batch.runtime import ensure_ray, setup_logging; "
            "setup_logging(); ensure_ray(); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = next((line for line in proc.stderr if "Ray; dashboard:" in line), "no dashboard line: 0:0")
        host, port = line.split("dashboard: ")[1].strip().removeprefix("http://").rsplit(":", 1)
        assert host == "127.0.0.1"
        listening = [c.laddr for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        assert http_status(f"http://127.0.0.1:{port}/api/jobs/") == 401
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def tiny_export(path, size=32):
    torch.manual_seed(0)
    return save_export(path, build_model("resnet18", len(TAGS)).state_dict(), arch="resnet18", tags=TAGS, size=size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=0.2, thresholds=np.full(len(TAGS), 0.2),
                       dropout=0.5, config={}, metrics={})


def predictors(cluster):
    actors = get_json(cluster, "/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    return [a for a in actors if "Predictor" in a.get("class_name", "") and a["state"] == "ALIVE"]
