"""K-fold training on a real local Ray (2 CPUs): the partition, OOF rows, the ensemble export, side-by-side
folds, a fold whose worker dies, a rerun, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from reference import plain_probs

from planet_batch.cluster.runtime import CapacityError, fault_file
from planet_batch.config import ConfigError, ScoreConfig, TrackingConfig, TrainConfig, load_config
from planet_batch.data.datasets import labelled_split
from planet_batch.data.labels import TAGS, decode
from planet_batch.export import load_export, load_model
from planet_batch.scoring.score import run_scoring
from planet_batch.tracking import connect
from planet_batch.training.folds import make_folds
from planet_batch.training.job import train
from planet_batch.training.metrics import fbeta, tune_thresholds
from planet_batch.training.train import TrainError

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
STAGES = [{"name": "s", "size": 32, "epochs": 2, "frozen": False, "lr": 0.01}]
# Two 1-worker folds of half a CPU each fit beside Ray Data's decode CPU on 2 cores: two at a time.
TINY = ["arch=resnet18", "weights=none", "batch_size=8", "workers=1", "cpus_per_worker=0.5", "precision=fp32",
        f"stages={json.dumps(STAGES)}"]


def cfg(*extra):
    return load_config(TrainConfig, None, [*TINY, *extra])


def test_folds_partition_the_labelled_images_the_same_way_for_the_same_seed(demo_root):
    every = labelled_split(demo_root)
    folds = make_folds(demo_root, 3, seed=7)
    held = [n for f in folds for n in f.held_out.names]
    assert sorted(held) == sorted(every.names)  # every image held out exactly once
    assert sorted(len(f.held_out) for f in folds) == [26, 27, 27]
    for f in folds:
        assert set(f.train.names) == set(every.names) - set(f.held_out.names)
    again = make_folds(demo_root, 3, seed=7)
    assert [f.held_out.names for f in again] == [f.held_out.names for f in folds]
    assert [f.held_out.names for f in make_folds(demo_root, 3, seed=8)] != [f.held_out.names for f in folds]


@pytest.fixture(scope="module")
def folded(ray_local, demo_root, tmp_path_factory, mlflow_server):
    """3 folds, two at a time, one of them losing a worker in its second epoch; tracked in MLflow."""
    import ray
    from ray._private import state

    point = "train:s:1:report:0"  # stage s, before epoch 1's report, rank 0: the first fold to get there
    fault_file(ray_local, point).touch()
    run = tmp_path_factory.mktemp("folds") / "run"
    tracker = connect(TrackingConfig(tracking=mlflow_server.uri, experiment="folds"))
    export = train(cfg("folds=3", "max_failures=2"), demo_root, run, tracker)
    controllers = [a for a in state.actors().values() if a["ActorClassName"] == "TrainController"]
    assert ray.is_initialized()
    return {"run": run, "export": export, "fired": fault_file(ray_local, point, "fired").exists(),
            "controllers": controllers, "tracker": tracker}


def test_each_fold_keeps_a_run_folder_and_two_folds_ran_at_the_same_time(folded):
    run = folded["run"]
    for i in range(3):
        for name in ("metrics.csv", "losses.png", "config.yaml", "export/model.json", "stages/s.pt"):
            assert (run / f"fold-{i}" / name).exists(), name
    spans = sorted((a["StartTime"], a["EndTime"]) for a in folded["controllers"])
    assert len(spans) == 3, spans
    assert spans[1][0] < spans[0][1], f"the second fold started after the first ended: {spans}"  # Ray's own times


def test_a_fold_whose_worker_dies_resumes_from_its_checkpoint(folded):
    import torch

    assert folded["fired"], "the fault never fired"
    resumed = [torch.load(p, weights_only=True)["resumed_after"] for p in folded["run"].glob("fold-*/stages/s.pt")]
    assert sorted(resumed) == [[], [], [0]], resumed  # one fold restarted from its epoch-0 checkpoint
    for i in range(3):
        epochs = pd.read_csv(folded["run"] / f"fold-{i}" / "metrics.csv")["epoch"].tolist()
        assert epochs == [0, 1], (i, epochs)


def test_oof_rows_are_what_each_fold_export_predicts_for_its_held_out_images(folded, demo_root):
    run = folded["run"]
    oof = pq.read_table(run / "oof.parquet").to_pandas()
    every = labelled_split(demo_root)
    assert sorted(oof["image_name"]) == sorted(every.names) and list(oof.columns[2:]) == list(TAGS)
    for i in range(3):
        rows = oof[oof["fold"] == i]
        paths = [demo_root / "train-jpg" / f"{n}.jpg" for n in rows["image_name"]]
        np.testing.assert_allclose(rows[list(TAGS)].to_numpy(), plain_probs(run / f"fold-{i}" / "export", paths, 32),
                                   atol=1e-5)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["fold"]) == ["0", "1", "2", "oof"] and metrics["n_valid"].tolist()[-1] == len(every)


def test_each_fold_trains_on_its_part_and_the_thresholds_are_tuned_on_the_oof_rows(folded, demo_root):
    """Fold i holds out exactly its part of the partition (its export validated on those images, not on a 20%
    split of everything), and the ensemble's thresholds are the ones tuned on all out-of-fold rows."""
    run = folded["run"]
    oof = pq.read_table(run / "oof.parquet").to_pandas()
    for fold in make_folds(demo_root, 3, cfg().seed):
        assert sorted(oof[oof["fold"] == fold.index]["image_name"]) == sorted(fold.held_out.names)
        assert load_export(run / fold.name / "export").metrics["n_valid"] == len(fold.held_out)
    every = labelled_split(demo_root)
    targets = dict(zip(every.names, every.targets))
    tuned = tune_thresholds(oof[list(TAGS)].to_numpy(), np.stack([targets[n] for n in oof["image_name"]]),
                            start=0.2)
    np.testing.assert_allclose(load_model(folded["export"]).thresholds, np.round(tuned, 4), atol=1e-9)
    # metrics.csv's out-of-fold F2 are those of the OOF rows, at 0.2 and at the tuned thresholds
    oof_row = pd.read_csv(run / "metrics.csv").iloc[-1]
    probs, truth = oof[list(TAGS)].to_numpy(), np.stack([targets[n] for n in oof["image_name"]])
    assert oof_row["fbeta"] == pytest.approx(fbeta(probs, truth, 0.2))
    assert oof_row["fbeta_tuned"] == pytest.approx(fbeta(probs, truth, tuned))


def test_a_k_fold_run_is_a_parent_mlflow_run_with_a_nested_run_per_fold(folded, mlflow_server):
    runs = mlflow_server.runs("folds", "tags.`planet_batch.job` = 'train'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert len(runs) == 4 and [r.info.run_name for r in children] == ["fold-0", "fold-1", "fold-2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for i, child in enumerate(children):  # the fold whose worker died too: each epoch once
        assert [s for s, _ in mlflow_server.points(child.info.run_id, "valid_loss")] == [1, 2]
        assert load_export(folded["run"] / f"fold-{i}" / "export").tracking_run == child.info.run_id
    oof = pd.read_csv(folded["run"] / "metrics.csv").iloc[-1]
    assert parent.data.metrics["oof_fbeta"] == pytest.approx(oof["fbeta"])
    assert parent.data.metrics["oof_fbeta_tuned"] == pytest.approx(oof["fbeta_tuned"])
    assert parent.data.params["folds"] == "3" and load_model(folded["export"]).tracking_run == parent.info.run_id
    assert mlflow_server.artifacts(parent.info.run_id) == ["export", "metrics.csv", "oof.parquet"]


def test_the_ensemble_export_scores_the_mean_of_its_folds_with_oof_thresholds(folded, demo_root, tmp_path,
                                                                             mlflow_server):
    ensemble = load_model(folded["export"])
    assert [str(m.weights.parent) for m in ensemble.members] == [str(folded["run"] / f"fold-{i}" / "export")
                                                                   for i in range(3)]
    summary = run_scoring(ScoreConfig(model=str(folded["export"]), data=str(demo_root), out=str(tmp_path / "s.csv"),
                                      probs_out=str(tmp_path / "p.parquet"), threshold="tuned", precision="fp32",
                                      tta=False),
                          folded["tracker"])
    assert summary.scored == 40
    # The scoring run: its summary, linked to the training run of the model it scored (the folds' parent)
    (scored,) = mlflow_server.runs("folds", "tags.`planet_batch.job` = 'score'")
    assert scored.data.tags["planet_batch.training_runs"] == ensemble.tracking_run
    assert {k: scored.data.metrics[k] for k in ("images", "scored", "unreadable", "resumed_images")} == {
        "images": 40, "scored": 40, "unreadable": 0, "resumed_images": 0}
    assert scored.data.metrics["images_per_s"] == summary.images_per_s and scored.data.tags["precision"] == "fp32"
    assert mlflow_server.artifacts(scored.info.run_id) == ["score_summary.json"]  # the submission on request
    probs = pq.read_table(tmp_path / "p.parquet").to_pandas()
    paths = [demo_root / ("test-jpg" if n.startswith("test_") else "test-jpg-additional") / f"{n}.jpg"
             for n in probs["image_name"]]
    members = [plain_probs(folded["run"] / f"fold-{i}" / "export", paths, 32) for i in range(3)]
    np.testing.assert_allclose(probs[list(TAGS)].to_numpy(), np.mean(members, axis=0), atol=1e-5)
    rows = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert list(rows["tags"]) == decode(probs[list(TAGS)].to_numpy(), np.asarray(ensemble.thresholds))


def test_a_rerun_keeps_the_finished_folds(folded, demo_root, caplog):
    """The same command again (here one fold at a time: how it runs, not what it trains) trains nothing."""
    caplog.set_level("INFO")
    before = (folded["run"] / "fold-1" / "export" / "model.pt").stat().st_mtime_ns
    train(cfg("folds=3", "max_failures=2", "parallel_folds=1"), demo_root, folded["run"])
    assert (folded["run"] / "fold-1" / "export" / "model.pt").stat().st_mtime_ns == before
    assert sum("finished by an earlier run" in r.getMessage() for r in caplog.records) == 3


def test_bad_fold_counts_are_one_line(demo_root):
    for k in (1, -2):
        with pytest.raises(ConfigError, match="folds: .*at least 2"):
            cfg(f"folds={k}")
    with pytest.raises(TrainError, match="folds: 81 folds of 80 labelled images"):
        make_folds(demo_root, 81, 0)


def test_folds_that_cannot_be_placed_fail_before_any_starts(ray_local, demo_root, tmp_path):
    with pytest.raises(CapacityError, match="4 workers x 1 CPUs = 4 CPUs asked for, the cluster has 2"):
        train(cfg("folds=3", "workers=4", "cpus_per_worker=1"), demo_root, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def run_cli(job, *args):
    return subprocess.run([sys.executable, f"jobs/{job}.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_bad_ensemble_exports_and_fold_counts_fail_with_one_line_from_the_cli(folded, demo_root, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(folded["run"], run, ignore=shutil.ignore_patterns("ray", "stages"))
    shutil.rmtree(run / "fold-2" / "export")
    bad = run_cli("score", "--model", run / "export", "--data", demo_root, "--out", tmp_path / "s.csv")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert f"ensemble export {run / 'export'}: member fold-2/export: " in bad.stderr, bad.stderr
    assert not (tmp_path / "s.csv").exists()

    shutil.copytree(folded["run"] / "fold-2" / "export", run / "fold-2" / "export")
    meta = json.loads((run / "fold-2" / "export" / "model.json").read_text())
    (run / "fold-2" / "export" / "model.json").write_text(json.dumps({**meta, "size": 64}))
    bad = run_cli("score", "--model", run / "export", "--data", demo_root, "--out", tmp_path / "s.csv")
    assert bad.returncode == 2 and "member fold-2/export takes 64px images, fold-0/export 32px" in bad.stderr

    bad = run_cli("train", "--config", "jobs/configs/demo.yaml", "--data", demo_root, "--out", tmp_path / "t",
                  "--folds", "500")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "planet-batch train: error: folds: 500 folds of 80 labelled images; at most one fold per image"), bad.stderr
    assert not (tmp_path / "t").exists()
    assert load_export(folded["run"] / "fold-0" / "export").size == 32
