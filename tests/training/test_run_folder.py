"""The run folder's rules without Ray: it is planet-batch's (run.json with its run id) or refused, one run each."""

import json
import shutil

import pytest
from snapshots import refused

from planet_batch.config import TrainConfig, load_config, save_config
from planet_batch.training import TrainError
from planet_batch.training.run_folder import RUN_ID_FILE, claim_run_folder, mark_run_folder, run_name

pytestmark = pytest.mark.usefixtures("no_ray")
TINY = ["arch=resnet18", "weights=none", "batch_size=8", "workers=1", "cpus_per_worker=0.5",
        'stages=[{"name": "s1", "size": 32, "epochs": 1, "frozen": false, "lr": 0.01}]']


def someones_folder(tmp_path):
    """A folder of another tool's outputs with names training writes too."""
    folder = tmp_path / "results"
    (folder / "export").mkdir(parents=True)
    (folder / "export" / "model.onnx").write_bytes(b"another model")
    (folder / "config.yaml").write_text("lr: 3\n")
    (folder / "metrics.csv").write_text("epoch,acc\n0,0.9\n")
    return folder


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--folds", "2"], ["--folds", "2", "--overwrite"]])
def test_a_folder_holding_what_training_writes_but_not_written_by_it_is_refused(demo_root, tmp_path, capsys, extra):
    folder = someones_folder(tmp_path)
    args = ["train", "--config", "jobs/configs/demo.yaml", "--data", demo_root, "--out", folder]
    assert refused(tmp_path, capsys, *args, *[a for t in TINY for a in ("--set", t)], *extra) == (
        f"run folder {folder} holds config.yaml, export, metrics.csv, not written by planet-batch (no "
        f"{RUN_ID_FILE}): give another --out; nothing there is touched")


def test_another_config_on_a_run_folder_is_refused_and_the_same_one_goes_on(demo_root, tmp_path, capsys):
    """A run folder holds one run: another model's config is one line and nothing touched; the same config (how it
    runs may differ: max_failures) goes on."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(TrainConfig, None, TINY)
    mark_run_folder(run)
    save_config(cfg, run / "config.yaml")
    (run / "export").mkdir()
    (run / "export" / "model.pt").write_bytes(b"the first run's weights")
    args = ["train", "--config", "jobs/configs/demo.yaml", "--data", demo_root, "--out", run,
            *[a for t in TINY for a in ("--set", t)]]
    assert refused(tmp_path, capsys, *args, "--set", "stages.0.epochs=2") == (
        f"run folder {run} holds a run of another config (stages[0].epochs: 1 -> 2): the same config resumes it, "
        "--overwrite starts over")
    claim_run_folder(run, load_config(TrainConfig, None, [*TINY, "max_failures=7"]))
    assert (run / "export" / "model.pt").read_bytes() == b"the first run's weights"


def test_overwrite_removes_only_what_training_wrote_and_gives_a_new_run_id(tmp_path):
    cfg = load_config(TrainConfig, None, TINY)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "batch.png").write_bytes(b"show_batch's grid")  # make demo writes it before training
    claim_run_folder(run, cfg)
    mark_run_folder(run)  # (training's first write)
    first = run_name(run)
    for name in ("stages", "export", "ray/" + first):
        (run / name).mkdir(parents=True)
    (run / "config.yaml").write_text((tmp_path / "x").as_posix())  # (any content: overwrite does not read it)
    (run / "notes.txt").write_text("mine")
    claim_run_folder(run, load_config(TrainConfig, None, [*TINY, "overwrite=true"]))
    assert sorted(p.name for p in run.iterdir()) == ["batch.png", "notes.txt", "ray", RUN_ID_FILE]
    assert not (run / "ray" / first).exists() and run_name(run) != first


def test_the_same_path_on_two_machines_is_two_runs(tmp_path):
    """Two machines sharing one --storage bucket, each with its own disk at the same run folder path: each run
    folder has its own run id, so neither resumes (nor, with --overwrite, deletes) the other's Ray Train run."""
    cfg = load_config(TrainConfig, None, [*TINY, "storage=s3://bucket/runs"])
    run = tmp_path / "runs" / "lite0"
    names = []
    for _ in "ab":
        shutil.rmtree(run, ignore_errors=True)  # machine B: the same path, its own disk
        claim_run_folder(run, cfg)
        mark_run_folder(run)  # (training's first write)
        names.append(run_name(run))
    on_a, on_b = names
    assert on_a != on_b and on_a.startswith("lite0-") and on_b.startswith("lite0-")
    claim_run_folder(run, cfg)
    mark_run_folder(run)
    assert run_name(run) == on_b  # the same command on the same machine resumes the same run


def test_a_run_json_that_is_not_planet_batchs_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_ID_FILE).write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(TrainError, match=f"{RUN_ID_FILE} is not planet-batch's"):
        claim_run_folder(tmp_path / "run", load_config(TrainConfig, None, TINY))
