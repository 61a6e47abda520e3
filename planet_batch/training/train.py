"""The lesson-3 recipe as data-parallel Ray Train: stages of fit_one_cycle, checkpoints, resume, export.

A training job is one `TorchTrainer.fit()` (this module, the driver): its workers go through the config's
stages (worker.py; each fastai's `fit_one_cycle` call, one epoch's steps in steps.py), switching to the stage's
data at the boundary. Workers only report metrics and checkpoints to Ray; the driver writes the run folder from
the checkpoints Ray kept (run_folder.py), so a run that resumed (after a lost worker, or a lost driver: the same
command again) leaves exactly its planned epochs in metrics.csv.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from planet_batch.cluster.runtime import (
    check_capacity,
    ensure_ray,
    quiet_data_progress,
    sigint_kept,
    torch_threads,
    verbose,
)
from planet_batch.cluster.storage import beside_reads, read_placement, write_atomic
from planet_batch.config import TrainConfig, save_config, to_dict
from planet_batch.data.datasets import Split, labelled_dataset, train_valid_split, unreadable
from planet_batch.data.labels import TAGS
from planet_batch.errors import first_line
from planet_batch.export import load_export
from planet_batch.model import build_model, normalization
from planet_batch.tracking import Run, flat_params, tracked
from planet_batch.training import TrainError
from planet_batch.training.run_folder import (
    claim_run_folder,
    export_run,
    local_checkpoints,
    mark_run_folder,
    ray_storage,
    run_name,
    write_run_folder,
)
from planet_batch.training.state import UNREADABLE, History, load_stage_weights
from planet_batch.training.steps import fold_prefix
from planet_batch.training.worker import WorkerPlan, train_loop

if TYPE_CHECKING:
    from planet_batch.training.job import TrainJob

log = logging.getLogger(__name__)

__all__ = ["TrainError", "run_training", "stage_datasets"]


def load_stage_file(path: Path | str) -> dict:
    """Model weights saved at the end of a stage (RUN_DIR/stages/NAME.pt), tensors only."""
    try:
        return load_stage_weights(path)
    except UNREADABLE as e:
        raise TrainError(f"cannot load saved stage {path}: {first_line(e)}") from None


def initial_state(cfg: TrainConfig) -> dict:
    """The first stage's weights, made in the driver so a missing weights file fails here, once."""
    first = cfg.stages[0].start_from
    if first is not None:
        return load_stage_file(first)
    if cfg.weights == "none":
        log.warning("weights: none - %s trains from random initialisation, no pretrained body", cfg.arch)
    return build_model(cfg.arch, len(TAGS), weights=cfg.weights, dropout=cfg.dropout).state_dict()


def start_files(cfg: TrainConfig) -> dict[str, dict]:
    """The saved stage files (.pt) that later stages start from, read here: the workers get them through the
    object store, wherever they run."""
    return {st.name: load_stage_file(st.start_file) for st in cfg.stages[1:] if st.start_file}


def kept_stages(cfg: TrainConfig) -> tuple[str, ...]:
    """The stages of this config that a later stage starts from: their final weights travel in the checkpoints."""
    return tuple(sorted({st.start_from for st in cfg.stages if st.start_from and not st.start_file}))


def stage_datasets(train: Split, valid: Split, sizes: Iterable[int], world: int,
                   label_selector: dict[str, str] | None = None) -> dict:
    """Per input size of the config: `train_SIZE` (augmented, split across workers by Ray Train) and
    `valid_SIZE_R`, worker R's slice of `valid`; every stage of that size reads them, one Ray Train run.

    Validation is not augmented, so it is decoded once per size and kept in the object store
    (20% of the chips at 128 px is ~0.4 GB) instead of restarting a decoding pipeline every
    epoch, which left the workers idle for its start-up and took the CPU that the next
    epoch's training data needed.
    """
    datasets = {}
    for size in sorted(set(sizes)):
        datasets[f"train_{size}"] = labelled_dataset(train, size, augment=True, label_selector=label_selector)
        for r in range(world):  # together the slices cover every validation image once
            part = labelled_dataset(valid.part(slice(r, None, world)), size, augment=False,
                                    label_selector=label_selector)
            datasets[f"valid_{size}_{r}"] = part.materialize()
    return datasets


@dataclass(frozen=True)
class RunImages:
    """A run's images and where Ray places their work: `reads`, the label selector of the read tasks (the data's
    node when only it has the files); `workers_at`, each worker's (storage.beside_reads)."""

    train: Split
    valid: Split
    reads: dict[str, str] | None
    workers_at: list[dict[str, str]] | None


@dataclass(frozen=True)
class SubRun:
    """One Ray Train run of a bigger job: a K-fold job's fold (folds.py) or a search's trial (tune.py)."""

    name: str  # what starts its console lines (`fold-2: ...`), as the runs' lines interleave
    parent: Run | None = None  # the job's MLflow run, which this run's nests under
    split: tuple[Split, Split] | None = None  # its training and validation images; None: the config's split
    side_by_side: int = 1  # how many runs' worker groups train at once (they share the data node's room)
    callbacks: tuple = ()  # Ray Train callbacks: a trial's reports to Ray Tune


REPORT_POLL_S = 0.25


def fit_run(cfg: TrainConfig, run_dir: Path, init: dict, images: RunImages, part: SubRun | None = None,
            tracking: Run | None = None):
    """Every stage of `cfg` in one Ray Train run (resumed from its latest checkpoint when it exists); Ray's result.

    Every epoch reports a checkpoint; the last epoch of each stage is kept (its weights are `stages/NAME.pt`)
    with the latest one, which Ray Train always keeps and resumes from. `part`: a fold's or a trial's run, for
    its console lines and its callbacks; `tracking`: the MLflow run rank 0 logs epochs into."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fold = part.name if part else ""

    # Ray Train's controller collects the workers' reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
    # and the run's last epoch waits until its report is registered (worker.Reports): on the default that cost
    # ~2 s at the end of the run and, when every epoch waited for its own, ~1.3 s an epoch. Ray passes the
    # variable from the driver to its controller; a value the user set stays.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    world = max(1, cfg.workers)
    train = images.train
    datasets = stage_datasets(train, images.valid, [st.size for st in cfg.stages], world, images.reads)
    storage, name = ray_storage(cfg, run_dir), run_name(run_dir)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": WorkerPlan(
            cfg=cfg,
            init=ray.put(init),
            start_files={n: ray.put(w) for n, w in start_files(cfg).items()},
            kept_stages=kept_stages(cfg),
            normalization=normalization(cfg.arch),
            steps_per_epoch=(len(train) // world) // cfg.batch_size,
            threads=torch_threads(cfg.torch_threads, cfg.cpus_per_worker),
            local_checkpoints=local_checkpoints(cfg, storage, name),
            verbose=verbose(),
            fold=fold,
            tracking=tracking,
        )},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker=resources if cfg.workers else None,
                                     placement_strategy=cfg.placement_strategy, label_selector=images.workers_at),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            callbacks=list(part.callbacks) if part else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ranked by `stage_end` (1 at a stage's last epoch), ties by recency: every stage's last checkpoint and
            # the newest others stay, at least the latest and the one before it (worker.restore falls back to it).
            checkpoint_config=CheckpointConfig(num_to_keep=len(cfg.stages) + 1, checkpoint_score_attribute="stage_end",
                                               checkpoint_score_order="max"),
            # Ray Train's own console lines (worker group start, checkpoint created, ...) at WARNING unless
            # --verbose; its system log files in the session folder keep every level.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train_")]),
    )
    # fit() leaves its SIGINT handler installed (a later Ctrl-C, scoring in lesson3, would be swallowed): until
    # Ray Train puts the handler back itself (not in 2.60: ray-project/ray#54188 only stops it aborting a finished run)
    with sigint_kept():
        try:
            result = trainer.fit()
        except SystemExit:
            # Ctrl-C (or SIGTERM) while Ray Train runs: its own SIGINT handler aborts the run, and Ray's blocking
            # get then raises SystemExit(1); the CLI says so in one line.
            raise KeyboardInterrupt from None
    if result.checkpoint is None:
        raise TrainError(f"run {name} finished without a checkpoint")
    return result


def check_batches(cfg: TrainConfig, n_train: int) -> None:
    per_worker = n_train // max(1, cfg.workers)
    if per_worker < cfg.batch_size:
        raise TrainError(
            f"batch_size {cfg.batch_size} is larger than the {per_worker} training images each of "
            f"{max(1, cfg.workers)} workers gets; lower batch_size or workers"
        )


def skip_unreadable(splits: list[Split], cfg: TrainConfig, run_dir: Path, reads: dict[str, str] | None) -> set[str]:
    """Every labelled image decoded once, before any training (a corrupt chip would fail every worker group's
    restart): the unreadable ones are listed in RUN/bad_train_images.csv with one warning and skipped, or with --strict
    fail the job here. Their names."""
    every = Split(tuple(n for s in splits for n in s.names), tuple(p for s in splits for p in s.paths),
                  np.concatenate([s.targets for s in splits]), splits[0].fs)
    bad = unreadable(every, max(st.size for st in cfg.stages), reads)
    listing = run_dir / "bad_train_images.csv"  # (lesson3 writes the test images' bad_images.csv beside it)
    if not bad:
        listing.unlink(missing_ok=True)  # (an earlier run's list: run_folder.WRITTEN)
        return set()
    write_atomic(listing, lambda p: pd.DataFrame({"image_name": list(bad), "error": list(bad.values())})
                 .to_csv(p, index=False))
    first = next(iter(bad))
    if cfg.strict:
        raise TrainError(f"{len(bad)} unreadable training images (--strict), first {first}: {bad[first]}; all "
                         f"listed in {listing}")
    log.warning("%d unreadable training images skipped (first %s: %s), listed in %s", len(bad), first, bad[first],
                listing)
    return set(bad)


def check_start_files(cfg: TrainConfig) -> None:
    for i, st in enumerate(cfg.stages):
        if st.start_file and not Path(st.start_file).is_file():
            raise TrainError(f"stages[{i}].start_from: {st.start_from} does not exist")


def open_run(job: TrainJob, parent: Run | None = None) -> Run | None:
    """The run folder's MLflow run (a K-fold run's fold: nested under `parent`), opened before Ray starts; its id is
    kept in the run folder, which this first write makes one."""
    if job.tracker is None:
        return None
    mark_run_folder(job.out)
    return job.tracker.open(job.out.name, params=flat_params(to_dict(job.cfg)) | {"data": str(job.data)},
                            tags={"planet_batch.job": "train", "planet_batch.run_folder": str(job.out)},
                            keep_in=job.out, parent=parent)


def finish_run(run: Run | None, run_dir: Path, history: History, export: Path, log_model: bool) -> None:
    """What the workers did not log (the last epoch, any a lost rank 0 missed), the final F2 and the files."""
    if run is None:
        return
    run.log_epochs(history.epochs)
    final = load_export(export).metrics
    run.log_metrics({f"final_{k}": final[k] for k in ("fbeta", "fbeta_tuned", "best_constant_fbeta", "n_valid")})
    run.log_artifacts([run_dir / n for n in ("config.yaml", "metrics.csv", "losses.png", "batch.png")])
    run.log_artifacts([export / "model.json", *([export / "model.pt"] if log_model else [])], "export")
    run.finish()


def run_training(job: TrainJob, part: SubRun | None = None) -> Path:
    """Train every stage of the job's config in one Ray Train run into its run folder; returns the export folder.
    The same command on the same run folder resumes an interrupted run from its latest checkpoint, and its
    MLflow run. `part`: one fold of a K-fold job (folds.py) or one trial of a search (tune.py): its images (by
    default the config's seeded valid_pct split), its name in the console lines, its parent MLflow run, the
    worker groups beside it, its callbacks.
    """
    cfg, run_dir, data = job.cfg, job.out, job.data
    split = part.split if part and part.split else None
    train, valid = split or train_valid_split(data, cfg.valid_pct, cfg.seed)  # bad labels: here
    name = part.name if part else ""
    check_batches(cfg, len(train))
    check_start_files(cfg)
    claim_run_folder(run_dir, cfg)
    weights = initial_state(cfg)
    with tracked(open_run(job, part.parent if part else None)) as run:
        ensure_ray()
        if not cfg.autoscale:
            check_capacity(cfg.workers, cfg.cpus_per_worker, cfg.gpu)
        quiet_data_progress()
        reads = read_placement(data, cfg.data_shared)
        mark_run_folder(run_dir)
        if split is None:  # (K folds check every image once, for all their folds)
            bad = skip_unreadable([train, valid], cfg, run_dir, reads)
            train, valid = train.without(bad), valid.without(bad)
            check_batches(cfg, len(train))
        workers_at = beside_reads(reads, cfg.workers, cfg.cpus_per_worker, cfg.gpu,
                                  part.side_by_side if part else 1, cfg.autoscale)
        save_config(cfg, run_dir / "config.yaml")
        log.info("%straining %s on %d images (%d held out) with %d worker(s); run folder %s",
                 fold_prefix(name), cfg.arch, len(train), len(valid), cfg.workers, run_dir)
        result = fit_run(cfg, run_dir, weights, RunImages(train, valid, reads, workers_at), part, run)
        if run is not None and result.metrics.get("tracking_lost"):
            run.lost = True  # rank 0 warned: the job goes on without the server
        final = write_run_folder(run_dir, cfg, result)
        export = export_run(run_dir, cfg, final, name, run.run_id if run else None)
    finish_run(run, run_dir, final.history, export, job.tracker is not None and job.tracker.options.log_model)
    return export
