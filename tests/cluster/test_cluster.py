"""Jobs on a real 2-node Ray cluster on 127.0.0.1, submitted through Ray's job API with token auth on.

The helpers (nodes as child processes, a worker node with its own view of the disk, a local S3
server) are in tests/clusters.py.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
from clusters import (
    client,
    http_status,
    predictors,
    run_job,
    stop,
    submit,
    two_node_cluster,
    wait_for,
)
from reference import tiny_export

from planet_batch.data.submission import check_submission

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


# First in the module: it runs its own cluster, before the shared one is started.
def committed(work) -> dict[str, bytes]:
    """The work folder's committed id files (each a whole shard), by name."""
    return {p.name: p.read_bytes() for p in (work / "commits").glob("*.parquet")
            if not p.name.endswith(".pending.parquet")} if (work / "commits").is_dir() else {}


def committed_rows(work) -> int:
    return sum(pq.ParquetFile(work / "commits" / name).metadata.num_rows for name in committed(work))


def test_losing_a_worker_node_mid_scoring_gives_a_whole_submission_or_a_loud_failure(demo_root, tmp_path):
    """Stop the worker node while the cluster scores: never a short or duplicated file; the shards committed before
    the loss are kept, and the same command again scores only what they do not hold."""
    from ray.job_submission import JobStatus

    from planet_batch.data.demo_data import write_demo_data

    # Long enough (~1.5 min) that the actors on the worker node, slow to start on 2 shared cores, get to work.
    data = write_demo_data(tmp_path / "data", n_train=4, n_test=1200, n_additional=300, seed=3)
    export = tiny_export(tmp_path / "export", size=96)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    work = out.parent / "submission.csv.parts"
    # The stall limit counts from the start: on a slower 2-core machine the first 100-row shard (actors importing
    # torch, then 800 TTA views) took over 30 s and the job failed before the node was stopped. --keep-parts: the
    # shards stay after a success too, for the rerun below.
    command = (f"python jobs/score.py --model {export} --data {data} --out {out} --batch-size 16 --tta "
               "--stall-timeout 90 --shard-rows 100 --keep-parts")
    with two_node_cluster(tmp_path) as c:
        jobs = client(c)
        job = submit(jobs, command)
        ended = (JobStatus.SUCCEEDED, JobStatus.FAILED)
        # Actors on the worker node are sometimes still starting when the work is done (2 shared cores):
        # stop the node once scoring runs, whatever it holds then (actors, decode tasks, blocks).
        wait_for(lambda: len(predictors(c)) >= 2 or jobs.get_job_status(job) in ended, 150, "scoring actors")
        time.sleep(5)
        held = {a["node_id"] for a in predictors(c)}
        nodes = len(held)
        assert jobs.get_job_status(job) not in ended, jobs.get_job_logs(job)[-3000:]
        # The node to be lost holds scoring actors (with the data local to the head, they all run there).
        assert c["worker_id"] in held, held
        stop(c["worker"])
        before_loss = committed(work)
        wait_for(lambda: jobs.get_job_status(job) in ended, 240, "the job's end")
        status, logs = jobs.get_job_status(job), jobs.get_job_logs(job)
        files = sorted(p.name for p in out.parent.iterdir())
        reasons = [line for line in logs.splitlines() if "score: error:" in line or line.startswith("ray.exceptions.")]
        # The outcome, for docs/reliability.md (visible with -s).
        print(f"after losing the worker node (actors on {nodes} nodes): {status}; {files}; {reasons}; "
              f"{len(before_loss)} shards committed at the loss")
        if status == JobStatus.SUCCEEDED:
            assert check_submission(out, data / "sample_submission_v2.csv") == [], logs[-3000:]
            out.unlink()
        else:  # a loud failure: our stall error or Ray's own, and nothing written
            assert reasons, logs[-3000:]
            assert "submission.csv" not in files and not any(".tmp" in f for f in files), files
        after = committed(work)
        assert all(after.get(name) == data_ for name, data_ in before_loss.items()), "a committed shard changed"
        kept = committed_rows(work)
        rerun = run_job(c, command).logs  # the head alone now
    summary = json.loads((out.parent / "score_summary.json").read_text())
    assert summary["resumed_images"] == kept and summary["scored_images"] == 1500 - kept, (summary, rerun[-2000:])
    assert check_submission(out, data / "sample_submission_v2.csv") == []


def test_scoring_resumes_after_the_head_node_is_lost(tmp_path):
    """Stop the head of a 2-node cluster once a third of the rows are in shards (the job dies with it), start a
    new cluster (its head alone: quicker), submit the same command: it scores only the rest, and the submission is
    the plain loop's."""
    import numpy as np
    from reference import plain_probs

    from planet_batch.data.demo_data import write_demo_data
    from planet_batch.data.labels import decode

    data = write_demo_data(tmp_path / "data", n_train=1, n_test=500, n_additional=250, seed=2)
    export = tiny_export(tmp_path / "export", size=64)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    work = out.parent / "submission.csv.parts"
    command = (f"python jobs/score.py --model {export} --data {data} --out {out} --batch-size 16 --shard-rows 50 "
               "--precision fp32 --no-tta")

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with two_node_cluster(tmp_path / "first") as c:
        job = submit(client(c), command)
        wait_for(lambda: committed_rows(work) >= 250, 240, "a third of the rows")
        stop(c["head"])
    kept = committed_rows(work)
    assert not out.exists() and kept < 750
    with two_node_cluster(tmp_path / "second", worker_node=False) as c:
        logs = run_job(c, command).logs
    assert f"{kept} of 750 images already scored" in logs, logs[-3000:]
    summary = json.loads((out.parent / "score_summary.json").read_text())
    assert summary["resumed_images"] == kept and summary["scored_images"] == 750 - kept, (summary, job)
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    names = [r[0] for r in rows]
    paths = [data / ("test-jpg" if n.startswith("test_") else "test-jpg-additional") / f"{n}.jpg" for n in names]
    assert [r[1] for r in rows] == decode(np.asarray(plain_probs(export, paths, 64)), 0.2)


def test_requests_without_the_token_are_refused(cluster):
    from ray.job_submission import JobSubmissionClient

    assert http_status(f"{cluster['url']}/api/jobs/") == 401
    assert http_status(f"{cluster['url']}/api/jobs/", "not-the-token") in (401, 403)
    assert http_status(f"{cluster['url']}/api/jobs/", cluster["token"]) == 200
    with pytest.raises(Exception, match="401|[Uu]nauthori[sz]ed|[Aa]uthenticat"):
        JobSubmissionClient(cluster["url"], headers={"Authorization": "Bearer wrong"}).list_jobs()


def test_a_local_ray_keeps_its_dashboard_on_loopback_and_wants_the_token(tmp_path):
    """The local Ray that `ensure_ray()` starts (jobs run outside a cluster): job API on 127.0.0.1, token on."""
    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="pb-lo-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    code = ("import sys; from planet_batch.cluster.runtime import ensure_ray, setup_logging; "
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


def test_training_resumes_mid_stage_on_a_new_cluster_from_checkpoints_on_s3(tmp_path):
    """Ray Train storage on the local S3 server: a cluster's head stopped in the second epoch of the second stage
    (the job dies with it); a new cluster, the same job: it goes on from the latest checkpoint. (Each cluster is a
    head alone: a worker node would add its start-up and change nothing the test sees.)"""
    import pyarrow.fs as pafs
    from clusters import s3_server, s3fs

    from planet_batch.cluster.runtime import FAULT_DIR_ENV, fault_file
    from planet_batch.data.demo_data import write_demo_data

    data = write_demo_data(tmp_path / "data", n_train=80, n_test=4, n_additional=2, seed=3)
    faults, run = tmp_path / "faults", tmp_path / "run"
    faults.mkdir()
    stages = ("[{name: s1, size: 32, epochs: 1, frozen: true, lr: 0.01}, "
              "{name: s2, size: 32, epochs: 3, frozen: false, lr: [1.0e-4, 2.0e-3]}]")
    command = (f"python jobs/train.py --config jobs/configs/demo.yaml --data {data} --out {run} --set arch=resnet18 "
               f"--set weights=none --set 'stages={stages}' --set batch_size=16 --set precision=fp32 "
               "--storage s3://planet/ray-train")
    fault_file(faults, "train:s2:1:report:0", "hang").touch()  # stage s2, before epoch 1's report, rank 0
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with s3_server(tmp_path) as s3_env:
        s3fs(s3_env).create_dir("planet")
        env = {**s3_env, FAULT_DIR_ENV: str(faults)}
        with two_node_cluster(tmp_path / "first", env=env, worker_node=False) as c:
            submit(client(c), command)
            wait_for(fault_file(faults, "train:s2:1:report:0", "hanging").exists, 300, "the second epoch of s2")
            stop(c["head"])
        assert not (run / "export").exists()
        on_s3 = s3fs(s3_env).get_file_info(pafs.FileSelector("planet/ray-train", recursive=True))
        assert any(f.path.endswith("state.pt") for f in on_s3), [f.path for f in on_s3]  # the checkpoints are there
        with two_node_cluster(tmp_path / "second", env=env, worker_node=False) as c:
            logs = run_job(c, command).logs
    assert "resuming s2 at epoch 1 (the checkpoint of s2 epoch 0)" in logs, logs[-3000:]
    assert "stage s1:" not in logs
    epochs = [line.split(",")[:2] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [["s1", "0"], ["s2", "0"], ["s2", "1"], ["s2", "2"]]
    assert (run / "export" / "model.json").exists() and (run / "stages" / "s1.pt").exists()
