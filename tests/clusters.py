"""A real multi-node Ray on 127.0.0.1 and a local S3-compatible server, for the cluster tests and bench.

No mocks of Ray: `ray start --head` and `ray start --address` run as child processes (each node with
2 logical CPUs of this 2-core machine), stopped by process group. A worker node can be given its own
view of the filesystem (`unshare -m` and an empty tmpfs over a folder), as on a real cluster whose
nodes share no disk. The S3 server is moto's, reached over real HTTP by pyarrow's S3 filesystem.
"""

import contextlib
import dataclasses
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

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log, wrap=None):
    # Each node's dashboard agent gets its own port: Ray's fixed default (52365) collides between nodes on one
    # machine, and a node without its agent cannot take jobs ("No available agent to submit job").
    cmd = [RAY, "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args]
    return subprocess.Popen(wrap(cmd) if wrap else cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc, grace_s: float = 1.0):
    """Stop a `ray start --block` and everything it started; a no-op when it is already gone.

    A worker node's exits within about a second of SIGTERM; a head's never did within 30 s (every cluster of
    the suite waited that long), so after `grace_s` its group is killed: the tests lose nodes, they do not
    test Ray's own shutdown."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    # Then whatever of its group is still draining: a GCS left running makes the next local Ray's Ray Train
    # placement-group cleaner find "multiple active Ray instances" and print a traceback (the console test).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def can_unshare() -> bool:
    """Whether this process may give a child its own mount namespace (root, as in CI)."""
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def hidden(folder: Path, args: list[str]) -> list[str]:
    """`args` run in a mount namespace of their own, with an empty tmpfs over `folder`: the node cannot see it."""
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs planet-batch-hidden "$0" && exec "$@"', str(folder), *args]


@contextlib.contextmanager
def two_node_cluster(tmp: Path, hide: Path | None = None, env: dict | None = None, worker_node: bool = True,
                     head_cpus: int = 2):
    """A head and a worker node on 127.0.0.1; yields what the tests need, stops both on exit.

    `worker_node=False`: the head alone, the single-node baseline of bench/cluster_score.py. `head_cpus`: the
    head's logical CPUs (the worker node has 2).
    `hide`: a folder the worker node does not see (its own mount namespace), as on a cluster whose
    nodes share no disk. `env`: extra environment for every node (and so for jobs and workers).
    """
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="pb-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    # As in an activated virtualenv: the jobs' `python` is this test run's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    procs = []
    try:
        procs.append(start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", f"--num-cpus={head_cpus}", f"--temp-dir={ray_tmp}"],
                           env, (tmp / "head.log").open("w")))
        url = f"http://127.0.0.1:{dash}"
        wait_for(lambda: http_status(f"{url}/api/version", token) == 200, 60, "the head's job API")
        cluster = {"url": url, "token": token, "env": env, "tmp": tmp, "head": procs[0], "gcs": f"127.0.0.1:{gcs}"}
        if worker_node:
            worker = [f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
            wrap = (lambda args: hidden(hide, args)) if hide else None
            procs.append(start(worker, env, (tmp / "worker.log").open("w"), wrap=wrap))
            cluster["worker"] = procs[1]
        wait_for(lambda: alive_nodes(url, token) == len(procs), 60, "the nodes")
        nodes = get_json(cluster, "/nodes?view=summary")["data"]["summary"]
        cluster["head_id"] = next(n["raylet"]["nodeId"] for n in nodes if n["raylet"].get("isHeadNode"))
        cluster["worker_id"] = next((n["raylet"]["nodeId"] for n in nodes if not n["raylet"].get("isHeadNode")), None)
        yield cluster
    except BaseException:
        # Ray's own logs (agents, raylets, GCS) go next to the node logs, for whoever reads the failure.
        with contextlib.suppress(OSError):
            shutil.copytree(ray_tmp / "session_latest" / "logs", tmp / "ray-logs", dirs_exist_ok=True)
        raise
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
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


def client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["url"], headers={"Authorization": f"Bearer {cluster['token']}"})


def submit(jobs, entrypoint, timeout=240) -> str:
    """Submit with this checkout as the working dir; a new head's job agent can need a while to come up (CI once
    saw a second cluster, started right after the first was stopped, refuse for over 80 s)."""
    end = time.time() + timeout
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > end:
                raise
            time.sleep(2)


@dataclasses.dataclass(frozen=True)
class Job:
    logs: str
    job_id: str  # Ray's id of the job, which its tasks and actors carry in the state API


def run_job(cluster, entrypoint, timeout=420) -> Job:
    from ray.job_submission import JobStatus

    c = client(cluster)
    job = submit(c, entrypoint)
    end = time.time() + timeout
    while time.time() < end:
        status = c.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.5)
    logs = c.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint} ended {status}:\n{logs[-4000:]}"
    return Job(logs, c.get_job_info(job).job_id)


def predictors(cluster):
    actors = get_json(cluster, "/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    return [a for a in actors if "Predictor" in a.get("class_name", "") and a["state"] == "ALIVE"]


def tasks_by_node(cluster, name_part: str, job: Job) -> dict[str, int]:
    """How many task attempts of `job` whose name contains `name_part` ran on each node (Ray's state API)."""
    tasks = get_json(cluster, "/api/v0/tasks?detail=1&limit=10000")["data"]["result"]["result"]
    counts: dict[str, int] = {}
    for t in tasks:
        if t.get("job_id") == job.job_id and name_part in t.get("name", "") and t.get("node_id"):
            counts[t["node_id"]] = counts.get(t["node_id"], 0) + 1
    return counts


S3_KEYS = {"AWS_ACCESS_KEY_ID": "planet-batch-test", "AWS_SECRET_ACCESS_KEY": "planet-batch-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(tmp: Path, auth: bool = False):
    """moto's S3-compatible server on 127.0.0.1; yields the environment that points pyarrow (and boto) at it.

    `auth`: every request is checked against moto's IAM, which knows no key, so all access is denied.
    """
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0" if auth else "inf"}  # moto's switch for IAM checks
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=(tmp / f"moto-{port}.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_status(f"{url}/moto-api/") == 200, 60, "the S3 server")
        yield {**S3_KEYS, "AWS_ENDPOINT_URL": url}
    finally:
        stop(proc)


def s3fs(s3_env: dict):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=s3_env["AWS_ACCESS_KEY_ID"], secret_key=s3_env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=s3_env["AWS_ENDPOINT_URL"], region=s3_env["AWS_DEFAULT_REGION"],
                             allow_bucket_creation=True)


def upload(s3_env: dict, folder: Path, bucket: str, prefix: str) -> str:
    """Copy `folder` to s3://bucket/prefix on the test server (the bucket is made); returns the URI."""
    import pyarrow.fs as pafs

    fs = s3fs(s3_env)
    fs.create_dir(bucket)
    pafs.copy_files(str(folder), f"{bucket}/{prefix}", pafs.LocalFileSystem(), fs)
    return f"s3://{bucket}/{prefix}"
