"""Both jobs on a 2-node cluster whose worker node does not see the data folder, as on a real cluster.

The worker node runs in its own mount namespace with an empty tmpfs over the data folder, so any
task that opens a data file there fails. With a local data root the reads must stay on the head
(the driver's node); with the data on a local S3 server every node reads it over HTTP.
"""

import json

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from clusters import can_unshare, get_json, run_job, s3_server, s3fs, tasks_by_node, two_node_cluster, upload
from reference import plain_probs, tiny_export

from planet_batch.data.demo_data import write_demo_data
from planet_batch.data.labels import TAGS
from planet_batch.data.submission import check_submission
from planet_batch.training.run_folder import run_name

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not can_unshare(), reason="needs `unshare -m` (root) to hide the data from one node"),
]
SIZE = 32
STAGE = "[{name: s1, size: 32, epochs: 2, frozen: true, lr: 0.01}]"


@pytest.fixture(scope="module")
def split_disk(tmp_path_factory):
    """A local S3 server with a copy of the data, and a cluster whose worker node cannot see the data folder."""
    tmp = tmp_path_factory.mktemp("split-disk")
    data = write_demo_data(tmp / "data", n_train=80, n_test=160, n_additional=40, seed=5)
    export = tiny_export(tmp / "export", size=SIZE)
    with s3_server(tmp) as s3_env:
        data_uri = upload(s3_env, data, "planet", "data")
        # Ray Data's own switch: start scoring once every actor is up, so that the worker node's actors
        # (slower to start on 2 shared cores) are there to take batches and the test can see them do so.
        env = {**s3_env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}
        with two_node_cluster(tmp, hide=data, env=env) as cluster:
            yield {**cluster, "data": data, "data_uri": data_uri, "export": export, "s3": s3_env}


def train_workers(c, job) -> list[dict]:
    """This job's Ray Train workers (not an earlier job's), from Ray's state API."""
    workers = get_json(c, "/api/v0/actors?detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D"
                          "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    return [w for w in workers if w["job_id"] == job.job_id]


def score_job(c, data, out, *extra):
    return run_job(c, f"python jobs/score.py --model {c['export']} --data {data} --out {out} --batch-size 16 "
                      "--precision fp32 --no-tta " + " ".join(extra))


def test_the_worker_node_really_cannot_see_the_data(split_disk):
    """The premise: a task pinned to the worker node finds an empty folder where the head has the data."""
    code = ("import os, ray; ray.init(); ls = ray.remote(lambda d: sorted(os.listdir(d))); "
            f"from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as N; "
            f"print('HEAD', ray.get(ls.options(scheduling_strategy=N('{split_disk['head_id']}', False))"
            f".remote('{split_disk['data']}'))); "
            f"print('WORKER', ray.get(ls.options(scheduling_strategy=N('{split_disk['worker_id']}', False))"
            f".remote('{split_disk['data']}')))")
    logs = run_job(split_disk, f'python -c "{code}"').logs
    head = next(line for line in logs.splitlines() if line.startswith("HEAD "))
    assert "'train-jpg'" in head and "'test-jpg'" in head and "'train_v2.csv'" in head, head
    assert "WORKER []" in logs


def test_score_reads_local_data_on_its_node_and_scores_on_both(split_disk, tmp_path):
    data, out = split_disk["data"], tmp_path / "submission.csv"
    job = score_job(split_disk, data, out, f"--probs-out {tmp_path / 'probs.parquet'}")
    assert "data is local to node" in job.logs
    sample = data / "sample_submission_v2.csv"
    assert check_submission(out, sample) == []
    probs = pq.read_table(tmp_path / "probs.parquet").to_pandas()
    names = list(probs["image_name"])
    paths = [data / ("test-jpg" if n.startswith("test_") else "test-jpg-additional") / f"{n}.jpg" for n in names]
    np.testing.assert_allclose(probs[list(TAGS)].to_numpy(), plain_probs(split_disk["export"], paths, SIZE),
                               atol=1e-5)
    # From Ray's own state, this job's tasks only: every read ran on the head, and the worker node's actors
    # scored batches.
    reads = tasks_by_node(split_disk, "ReadBinary", job)
    assert set(reads) == {split_disk["head_id"]}, reads
    scored = tasks_by_node(split_disk, "Predictor", job)
    assert scored.get(split_disk["worker_id"], 0) > 0, scored
    summary = json.loads((tmp_path / "score_summary.json").read_text())
    print(f"2 nodes, data on the head only: {summary['images_per_s']} images/s")


def test_score_from_and_to_s3_equals_the_local_run(split_disk, tmp_path):
    local = tmp_path / "local.csv"
    score_job(split_disk, split_disk["data"], local)
    out_uri = "s3://planet/out/submission.csv"
    job = score_job(split_disk, split_disk["data_uri"], out_uri, "--probs-out s3://planet/out/probs.parquet")
    assert f"submission: {out_uri}" in job.logs and "data is local" not in job.logs
    fs = s3fs(split_disk["s3"])
    with fs.open_input_stream("planet/out/submission.csv") as f:
        assert f.read() == local.read_bytes()
    summary = json.loads(fs.open_input_stream("planet/out/score_summary.json").read())
    assert summary["images"] == 200 and summary["output"] == out_uri
    assert fs.get_file_info("planet/out/probs.parquet").size > 0
    reads = tasks_by_node(split_disk, "ReadBinary", job)
    assert reads.get(split_disk["worker_id"], 0) > 0, reads  # read from S3 on the node without the data folder
    assert tasks_by_node(split_disk, "Predictor", job).get(split_disk["worker_id"], 0) > 0
    print(f"2 nodes, data on S3: {summary['images_per_s']} images/s")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_train_runs_every_epoch_with_a_worker_on_each_node(split_disk, tmp_path, where):
    run = tmp_path / "run"
    data = split_disk["data"] if where == "local" else split_disk["data_uri"]
    storage = "" if where == "local" else "--storage s3://planet/ray-train"  # checkpoints on S3 too
    job = run_job(split_disk, (
        f"python jobs/train.py --config jobs/configs/demo.yaml --data {data} --out {run} {storage} "
        f"--set 'stages={STAGE}' --set batch_size=16 --set placement_strategy=STRICT_SPREAD"
    ))
    epochs = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [line.split(",")[:2] for line in epochs] == [["s1", "0"], ["s1", "1"]]
    assert (run / "export" / "model.json").exists()
    workers = train_workers(split_disk, job)
    assert len(workers) == 2 and {w["node_id"] for w in workers} == {split_disk["head_id"], split_disk["worker_id"]}
    if where == "local":
        assert set(tasks_by_node(split_disk, "load_labelled_batch", job)) == {split_disk["head_id"]}
    else:  # the checkpoints went to the bucket, under this run's Ray Train run folder
        prefix = f"planet/ray-train/{run_name(run.resolve())}"
        on_s3 = s3fs(split_disk["s3"]).get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        assert any(f.path.endswith("/state.pt") for f in on_s3), [f.path for f in on_s3]


@pytest.fixture(scope="module")
def small_head(tmp_path_factory):
    """Data on the head only, and the head has 1 CPU (the worker node 2): the tasks pinned to the head need that CPU."""
    tmp = tmp_path_factory.mktemp("small-head")
    data = write_demo_data(tmp / "data", n_train=60, n_test=300, n_additional=60, seed=6)
    with two_node_cluster(tmp, hide=data, head_cpus=1) as cluster:
        yield {**cluster, "data": data}


def test_a_data_node_with_one_cpu_scores_with_the_actors_elsewhere(small_head, tmp_path):
    """The read and write tasks pinned to the 1-CPU head get its CPU (the actors go to the other node), where they
    once waited without end behind actors holding it. (A head with no CPU at all: tests/cluster/test_storage.py.)"""
    c, data = small_head, small_head["data"]
    export = tiny_export(tmp_path / "export", size=SIZE)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    job = run_job(c, f"python jobs/score.py --model {export} --data {data} --out {out} --batch-size 16 "
                     "--precision fp32 --stall-timeout 60")
    assert check_submission(out, data / "sample_submission_v2.csv") == []
    assert set(tasks_by_node(c, "ReadBinary", job)) == {c["head_id"]}
    assert set(tasks_by_node(c, "Predictor", job)) == {c["worker_id"]}


def test_a_data_node_with_one_cpu_trains_with_the_workers_elsewhere(small_head, tmp_path):
    """SPREAD would put one of the two 1-CPU workers on the 1-CPU head, whose decode tasks then never got a CPU
    (the job waited without end): the workers that leave the data node no CPU for its reads go elsewhere."""
    c, run = small_head, tmp_path / "run"
    job = run_job(c, (
        f"python jobs/train.py --config jobs/configs/demo.yaml --data {c['data']} --out {run} "
        "--set 'stages=[{name: s1, size: 32, epochs: 1, frozen: true, lr: 0.01}]' --set batch_size=8 "
        "--set workers=2 --set cpus_per_worker=1 --set placement_strategy=SPREAD"
    ), timeout=300)
    assert len((run / "metrics.csv").read_text().splitlines()) == 2
    assert {w["node_id"] for w in train_workers(c, job)} == {c["worker_id"]}
    assert set(tasks_by_node(c, "load_labelled_batch", job)) == {c["head_id"]}
