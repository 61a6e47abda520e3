"""K-fold training: K Ray Train runs side by side, out-of-fold thresholds, and a fold ensemble export.

What Kaggle's Planet winners did: every labelled image is held out by exactly one fold, so the
out-of-fold (OOF) predictions cover the whole labelled set and per-class thresholds tuned on them
do not overfit a 20% split; the K fold models are averaged at scoring time. The folds are
independent Ray Train runs, so the driver starts as many at once as the cluster has room for.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from planet_batch.cluster.runtime import check_capacity, ensure_ray, runs_that_fit
from planet_batch.cluster.storage import Location, read_placement, write_atomic
from planet_batch.config import ConfigError, TrainConfig, from_dict, to_dict
from planet_batch.data.datasets import Split, labelled_split, load_labelled_batch
from planet_batch.data.labels import TAGS
from planet_batch.data.layout import fold_indices
from planet_batch.errors import PlanetBatchError
from planet_batch.export import ExportedModel, ExportError, load_export, load_model, save_ensemble
from planet_batch.model import predict_batches, resolve_precision
from planet_batch.tracking import RUN_FILE, Run, tracked
from planet_batch.training import TrainError
from planet_batch.training.metrics import fbeta, tune_thresholds
from planet_batch.training.run_folder import (
    check_run_folder,
    claim_run_folder,
    mark_run_folder,
    same_run,
    write_metrics,
)
from planet_batch.training.train import SubRun, open_run, run_training, skip_unreadable

if TYPE_CHECKING:
    from planet_batch.training.job import TrainJob

log = logging.getLogger(__name__)

FOLD_COLUMNS = ("fold", "n_train", "n_valid", "fbeta", "fbeta_tuned", "time")


@dataclass(frozen=True)
class Fold:
    index: int
    train: Split
    held_out: Split

    @property
    def name(self) -> str:
        return f"fold-{self.index}"


@dataclass(frozen=True)
class FoldResult:
    fold: Fold
    export: ExportedModel
    probs: np.ndarray  # the fold export's probabilities for its held-out images, in their order
    seconds: float  # 0 for a fold finished by an earlier run


def make_folds(data: Location, k: int, seed: int) -> list[Fold]:
    """The seeded K-fold partition of the labelled images: the same for the same seed, anywhere."""
    every = labelled_split(data)
    if k > len(every):
        raise TrainError(f"folds: {k} folds of {len(every)} labelled images; at most one fold per image")
    parts = fold_indices(every.names, k, seed)
    return [Fold(i, every.part(np.concatenate([p for j, p in enumerate(parts) if j != i])), every.part(held))
            for i, held in enumerate(parts)]


def predict(export: ExportedModel, split: Split, precision: str, batch_size: int = 64, tta: bool = False
            ) -> np.ndarray:
    """The export's probabilities for `split`'s images in TAGS order, as `planet-batch score` computes them (the
    same decoder and forward pass, model.predict_batches; with `tta` as `score --tta`)."""
    device = torch.device("cpu")
    batches = (load_labelled_batch({"path": split.paths[i:i + batch_size], "target": split.targets[i:i + batch_size]},
                                   export.size, augment=False, fs=split.fs) for i in range(0, len(split), batch_size))
    probs = [torch.sigmoid(out)[:, export.to_tags].numpy() for _, out in
             predict_batches(export.build(device), batches, device, export.normalize,
                             resolve_precision(precision, device), tta)]
    return np.concatenate(probs) if probs else np.zeros((0, len(export.tags)), np.float32)


def finished_export(fold_dir: Path, cfg: TrainConfig) -> ExportedModel | None:
    """The fold's export when an earlier run of the same config finished it (none with `overwrite`)."""
    try:
        export = load_export(fold_dir / "export")
        earlier = from_dict(TrainConfig, export.config)
    except (ExportError, ConfigError):
        return None
    return export if not cfg.overwrite and same_run(earlier, cfg) is None else None


def train_fold(job: TrainJob, fold: Fold, parent: Run | None, side_by_side: int) -> FoldResult:
    """One fold's run folder RUN/fold-i (kept when an earlier run finished it) and its out-of-fold predictions;
    `parent`: the K-fold job's MLflow run; `side_by_side`: how many folds train at once."""
    cfg = job.cfg
    fold_job = replace(job, out=job.out / fold.name)
    t0 = time.perf_counter()
    export = finished_export(fold_job.out, cfg)
    if export is not None:
        log.info("%s: finished by an earlier run, export kept: %s", fold.name, fold_job.out / "export")
        seconds = 0.0
    else:
        part = SubRun(fold.name, parent, (fold.train, fold.held_out), side_by_side)
        export = load_export(run_training(fold_job, part))
        seconds = time.perf_counter() - t0
    # (with valid_tta the out-of-fold rows, and so the ensemble's thresholds, are a TTA submission's)
    probs = predict(export, fold.held_out, cfg.precision, cfg.batch_size, cfg.valid_tta)
    return FoldResult(fold, export, probs, seconds)


def run_folds(job: TrainJob) -> Path:
    """Train `cfg.folds` folds (each a run folder RUN/fold-i), write RUN/oof.parquet and RUN/metrics.csv, and
    export the fold ensemble with thresholds tuned on every out-of-fold row; returns RUN/export. With tracking:
    a parent MLflow run with each fold's nested in it."""
    cfg, run_dir = job.cfg, job.out
    folds = make_folds(job.data, cfg.folds, cfg.seed)  # bad labels and K fail here, before Ray
    check_run_folder(run_dir)
    for f in folds:  # as is another config on a fold's run folder
        claim_run_folder(run_dir / f.name, cfg)
    if cfg.overwrite:
        (run_dir / RUN_FILE).unlink(missing_ok=True)
    with tracked(open_run(job)) as parent:
        export = train_folds(job, folds, parent)
    if parent is not None:
        oof = load_model(export).metrics
        parent.log_metrics({k: oof[k] for k in ("oof_fbeta", "oof_fbeta_tuned", "n_oof")})
        parent.log_artifacts([run_dir / "metrics.csv", run_dir / "oof.parquet"])
        parent.log_artifacts([export / "model.json"], "export")
        parent.finish()
    return export


def train_folds(job: TrainJob, folds: list[Fold], parent: Run | None) -> Path:
    """The folds not finished yet, as many at a time as the cluster holds; the ensemble export."""
    cfg, run_dir = job.cfg, job.out
    ensure_ray()
    if not cfg.autoscale:
        check_capacity(cfg.workers, cfg.cpus_per_worker, cfg.gpu)  # one fold's worker group, before any starts
    mark_run_folder(run_dir)
    bad = skip_unreadable([f.held_out for f in folds], cfg, run_dir, read_placement(job.data, cfg.data_shared))
    folds = [Fold(f.index, f.train.without(bad), f.held_out.without(bad)) for f in folds]
    # Local mode (workers 0) trains inside this process, where Ray Train's context is one per process.
    parallel = 1 if cfg.workers == 0 else min(cfg.parallel_folds, cfg.folds) if cfg.parallel_folds \
        else runs_that_fit(cfg.workers, cfg.cpus_per_worker, cfg.gpu, cfg.folds)
    log.info("%d folds of %d labelled images (%d held out each), %d at a time; run folder %s", cfg.folds,
             sum(len(f.held_out) for f in folds), len(folds[0].held_out), parallel, run_dir)
    # Threads, as Ray Tune runs trainers: each fold's driver side (its Ray Train controller, its run folder)
    # stays on this machine, and Ray schedules the folds' worker groups side by side.
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="fold")
    futures = [pool.submit(train_fold, job, f, parent, parallel) for f in folds]
    try:
        errors = [f.exception() for f in futures]
    except KeyboardInterrupt:
        # Not the executor's `with`, whose exit waits for the running folds: they wait inside Ray Train's fit,
        # which only a main-thread handler can abort, so Ctrl-C would wait for every fold to finish. The folds
        # not started are dropped; the CLI ends the driver at once, and the running folds' runs with it.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    failed = [(fold, e) for fold, e in zip(folds, errors) if e is not None]
    if failed:  # every other fold has finished (or failed) by now: what finished is kept
        fold, e = failed[0]
        if not isinstance(e, PlanetBatchError):
            raise e
        raise TrainError(f"{fold.name}: {e} ({len(folds) - len(failed)} of {len(folds)} folds finished and are "
                         "kept: the same command again trains only the others)") from None
    return write_results(cfg, run_dir, [f.result() for f in futures], parent)


def write_results(cfg: TrainConfig, run_dir: Path, results: list[FoldResult], parent: Run | None = None) -> Path:
    names = [n for r in results for n in r.fold.held_out.names]
    probs = np.concatenate([r.probs for r in results])
    targets = np.concatenate([r.fold.held_out.targets for r in results])
    thresholds = tune_thresholds(probs, targets, start=cfg.threshold)
    oof = pd.DataFrame({"image_name": names, "fold": np.repeat([r.fold.index for r in results],
                                                               [len(r.fold.held_out) for r in results])})
    oof = pd.concat([oof, pd.DataFrame(probs, columns=list(TAGS))], axis=1).sort_values("image_name")
    write_atomic(run_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))

    rows = [{"fold": r.fold.index, "n_train": len(r.fold.train), "n_valid": len(r.fold.held_out),
             "fbeta": fbeta(r.probs, r.fold.held_out.targets, cfg.threshold),
             "fbeta_tuned": r.export.metrics.get("fbeta_tuned"), "time": round(r.seconds, 1)} for r in results]
    summary = {"fold": "oof", "n_train": "", "n_valid": len(names), "fbeta": fbeta(probs, targets, cfg.threshold),
               "fbeta_tuned": fbeta(probs, targets, thresholds), "time": round(sum(r.seconds for r in results), 1)}
    write_metrics(run_dir, [*rows, summary], FOLD_COLUMNS)
    export = save_ensemble(run_dir / "export", [f"{r.fold.name}/export" for r in results],
                           threshold=cfg.threshold, thresholds=thresholds, config=to_dict(cfg),
                           metrics={"oof_fbeta": summary["fbeta"], "oof_fbeta_tuned": summary["fbeta_tuned"],
                                    "n_oof": len(names), "folds": rows},
                           tracking_run=parent.run_id if parent else None)
    log.info("out of fold: F2 %.4f at %.2f, %.4f with thresholds tuned on all %d rows; %d-fold ensemble: %s",
             summary["fbeta"], cfg.threshold, summary["fbeta_tuned"], len(names), len(results), export)
    return export

