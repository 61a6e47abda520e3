"""Locations: local paths and URIs through pyarrow's filesystems, against a real local S3 server."""

import pyarrow.fs as pafs
import pytest
from clusters import s3_server, s3fs, upload
from reference import tiny_export

from planet_batch.cli import main
from planet_batch.cluster.runtime import CapacityError
from planet_batch.cluster.storage import (
    NODE_ID_LABEL,
    StorageError,
    beside_reads,
    elsewhere,
    existing_dir,
    locate,
    read_placement,
)
from planet_batch.data.datasets import train_valid_split
from planet_batch.data.layout import find_layout
from planet_batch.export import load_export


@pytest.fixture(scope="module")
def s3(tmp_path_factory, demo_root):
    """moto's S3 server on 127.0.0.1 with the demo data at s3://planet/data and an export at s3://planet/export."""
    tmp = tmp_path_factory.mktemp("s3")
    with s3_server(tmp) as env:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            upload(env, demo_root, "planet", "data")
            upload(env, tiny_export(tmp / "export"), "planet", "export")
            s3fs(env).open_output_stream("planet/not-planet/readme.txt").write(b"no layout here")
            yield env


def test_a_local_path_and_its_file_uri_are_the_same_location(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    plain, uri = locate(tmp_path / "a.txt"), locate(f"file://{tmp_path}/a.txt")
    assert plain == uri and plain.local and str(plain) == str(tmp_path / "a.txt")
    assert plain.read_bytes() == b"x" and plain.parent.is_dir() and (plain.parent / "a.txt").is_file()
    assert [f.name for f in plain.parent.files(".txt")] == ["a.txt"]


def test_atomic_writes_leave_the_old_file_when_the_writer_fails(tmp_path):
    target = locate(tmp_path / "out.csv")
    target.write_atomic(lambda p: p.write_text("old"))

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        target.write_atomic(broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_atomic_writes_reach_the_disk_before_the_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    """A power loss after write_atomic leaves the old file or the whole new one: the data is fsynced before the
    rename, and the folder (the rename itself) after it."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "run.json"
    locate(target).write_atomic(lambda p: p.write_text("{}"))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".run.json.")) and events[1:] == [
        ("replace", str(target)), ("fsync", str(tmp_path))]


def test_a_work_folder_on_s3_is_refused_unless_empty_and_removed_only_when_made(s3):
    from planet_batch.scoring.shards import WorkFolder, WorkFolderError

    fs = s3fs(s3)
    fs.open_output_stream("planet/scratch/other-job/part-0.parquet").write(b"another job's rows")
    with pytest.raises(WorkFolderError, match="exists and is not one"):
        WorkFolder.open("s3://planet/scratch", {"size": 32}, overwrite=True)
    assert fs.get_file_info("planet/scratch/other-job/part-0.parquet").size == 18
    work = WorkFolder.open("s3://planet/work", {"size": 32}, overwrite=False)
    fs.open_output_stream("planet/work/shards/x-0.parquet").write(b"rows")
    work.remove()
    assert fs.get_file_info(pafs.FileSelector("planet/work", allow_not_found=True)) == []


def test_two_machines_with_the_same_run_folder_path_keep_their_own_ray_runs_on_s3(s3, tmp_path):
    """Machine A's run and machine B's at the same path share one --storage bucket: B's --overwrite removes B's Ray
    Train run only."""
    import shutil

    from planet_batch.config import TrainConfig, load_config, save_config
    from planet_batch.training.run_folder import claim_run_folder, mark_run_folder, run_name

    tiny = ["arch=resnet18", 'stages=[{"name": "s", "size": 32, "epochs": 1, "frozen": true, "lr": 0.01}]',
            "storage=s3://planet/ray-train"]
    cfg, over = load_config(TrainConfig, None, tiny), load_config(TrainConfig, None, [*tiny, "overwrite=true"])
    fs, run = s3fs(s3), tmp_path / "runs" / "lite0"
    names = []
    for machine in "ab":
        shutil.rmtree(run, ignore_errors=True)  # each machine its own disk
        claim_run_folder(run, cfg)
        mark_run_folder(run)  # (training's first write)
        names.append(run_name(run))
        fs.open_output_stream(f"planet/ray-train/{names[-1]}/checkpoint_0/state.pt").write(machine.encode())
        save_config(cfg, run / "config.yaml")
    claim_run_folder(run, over)  # machine B starts over
    assert fs.get_file_info(f"planet/ray-train/{names[0]}/checkpoint_0/state.pt").size == 1
    assert fs.get_file_info(f"planet/ray-train/{names[1]}/checkpoint_0/state.pt").type == pafs.FileType.NotFound
    assert names[0] != names[1] and run_name(run) not in names


def test_layout_labels_and_export_read_from_s3_equal_the_local_ones(s3, demo_root):
    remote = find_layout("s3://planet/data", need=("train", "test"))
    assert remote.kind == "competition" and str(remote.train_csv) == "s3://planet/data/train_v2.csv"
    (tr_s3, va_s3), (tr, va) = train_valid_split("s3://planet/data"), train_valid_split(demo_root)
    assert tr_s3.names == tr.names and va_s3.names == va.names and (tr_s3.targets == tr.targets).all()
    assert isinstance(tr_s3.fs, pafs.S3FileSystem) and tr_s3.paths[0].startswith("planet/data/train-jpg/")
    assert load_export("s3://planet/export").arch == "resnet18"


def test_outputs_go_to_s3_whole(s3):
    out = locate("s3://planet/out/sub.csv")
    out.parent.check_writable_folder()
    out.write_atomic(lambda p: p.write_text("image_name,tags\n"))
    assert out.read_bytes() == b"image_name,tags\n"
    with pytest.raises(StorageError, match="bucket 'nobucket' does not exist"):
        locate("s3://nobucket/out").check_writable_folder()


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("data, message", [
    ("foo://bucket/data", "foo://bucket/data: cannot open (Unrecognized filesystem type"),
    ("s3://nobucket/data", "s3://nobucket/data: bucket 'nobucket' does not exist"),
    ("s3://planet/nothing", "s3://planet/nothing: nothing under this prefix"),
    ("s3://planet/not-planet", "no test data under s3://planet/not-planet"),
    ("s3://KEY:pa55w0rd@planet/data", "credentials do not go in the URI"),
])
def test_bad_data_uris_are_one_line_exit_2_and_write_nothing(s3, capsys, tmp_path, data, message):
    import ray

    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    code, err = run_cli(capsys, "score", "--model", "s3://planet/export", "--data", data, "--out", str(out))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert "pa55w0rd" not in err[0]
    code, err = run_cli(capsys, "train", "--config", "jobs/configs/demo.yaml", "--data", data, "--out",
                        str(tmp_path / "run"))
    assert code == 2 and len(err) == 1, err
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "run").exists()
    assert not ray.is_initialized()  # all of it before Ray starts


def test_a_denied_key_is_one_line_naming_the_uri(tmp_path, capsys, monkeypatch):
    with s3_server(tmp_path, auth=True) as env:  # moto checks every request against IAM, which knows no key
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        code, err = run_cli(capsys, "score", "--model", str(tiny_export(tmp_path / "export")), "--data",
                            "s3://planet/data", "--out", str(tmp_path / "sub.csv"))
    assert code == 2 and len(err) == 1 and err[0].startswith("planet-batch score: error: data root s3://planet/data")
    assert "ACCESS_DENIED" in err[0] and env["AWS_SECRET_ACCESS_KEY"] not in err[0]
    assert not (tmp_path / "sub.csv").exists()


def test_existing_dir_names_what_it_checks(tmp_path):
    with pytest.raises(StorageError, match=f"--images {tmp_path / 'nope'} is not a directory"):
        existing_dir(tmp_path / "nope", "--images")


@pytest.mark.ray
def test_local_data_is_read_on_the_drivers_node_unless_shared_and_uris_everywhere(ray_local, s3, tmp_path, monkeypatch):
    import ray

    here = ray.get_runtime_context().get_node_id()
    assert read_placement(locate(tmp_path), shared=False) == {NODE_ID_LABEL: here}
    assert read_placement(locate(f"file://{tmp_path}"), shared=False) == {NODE_ID_LABEL: here}
    assert read_placement(locate(tmp_path), shared=True) is None
    assert read_placement(locate("s3://planet/data"), shared=False) is None
    # One node: the actors share it with the pinned tasks (there is nowhere else)
    assert elsewhere({NODE_ID_LABEL: here})[0] == {} and elsewhere(None)[0] == {}
    # A node with no CPU (a head started with --num-cpus=0) could never run the tasks pinned to it
    nodes = ray.nodes()
    monkeypatch.setattr(ray, "nodes", lambda: [{**n, "Resources": {**n["Resources"], "CPU": 0.0}} for n in nodes])
    with pytest.raises(StorageError, match=f"is local to node {here[:12]}, which has no CPU for the tasks that read"):
        read_placement(locate(tmp_path), shared=False)


def test_training_workers_leave_the_data_node_a_cpu_for_its_reads(monkeypatch):
    """Ray Train's per-worker label selectors when the reads are pinned to node D, from what ray.nodes() reports."""
    import ray

    def cluster(*nodes):
        monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": name, "Alive": True, "Resources": res}
                                                   for name, res in nodes])

    here, away = {NODE_ID_LABEL: "D"}, {NODE_ID_LABEL: "!D"}
    cluster(("D", {"CPU": 1.0}), ("W", {"CPU": 2.0}))
    assert beside_reads(None, 2, 1.0) is None
    assert beside_reads(here, 0, 1.0) is None  # local mode: no worker group
    assert beside_reads(here, 2, 1.0) == [away, away]  # a worker on D would take the reads' only CPU
    cluster(("D", {"CPU": 2.0}), ("W", {"CPU": 2.0}))
    assert beside_reads(here, 2, 1.0) == [{}, away]
    assert beside_reads(here, 2, 0.5) is None  # both fit beside the reads
    cluster(("D", {"CPU": 3.0}), ("W", {"CPU": 4.0}))
    assert beside_reads(here, 2, 1.0, groups=2) == [{}, away]  # two folds share D's two spare CPUs
    cluster(("D", {"CPU": 1.9}),)
    assert beside_reads(here, 3, 0.3) is None  # one node (a local Ray): 0.9 CPU holds three 0.3-CPU workers
    cluster(("D", {"CPU": 1.0}), ("W", {"CPU": 2.0}))
    with pytest.raises(CapacityError, match="room there for 0 of the 3 workers, and the other nodes hold 2 of the"):
        beside_reads(here, 3, 1.0)
    assert beside_reads(here, 3, 1.0, autoscale=True) == [away] * 3  # the autoscaler adds other nodes
    cluster(("D", {"CPU": 1.0}), ("W", {"CPU": 8.0, "GPU": 1.0}))
    with pytest.raises(CapacityError, match="other nodes hold 1 of the rest"):
        beside_reads(here, 2, 1.0, gpu=True)
    cluster(("D", {"CPU": 3.0}), ("W", {"CPU": 0.0}))
    with pytest.raises(CapacityError, match="--parallel-folds"):
        beside_reads(here, 2, 1.0, groups=2)
