"""Inside each Ray Train worker: the config's stages as fastai's `fit_one_cycle` calls, one epoch at a time.

`train_loop` is Ray Train's `train_loop_per_worker`; `Worker` runs one step a method (resume, build, begin a
stage, train, validate, record, track, report) from Ray's latest checkpoint if there is one. Workers only report
metrics and checkpoints; the driver (train.py) writes the run folder from what Ray kept.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planet_batch.cluster.runtime import ProgressLine, maybe_inject_fault, setup_logging
from planet_batch.config import TrainConfig, to_dict
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import Normalization
from planet_batch.errors import first_line
from planet_batch.model import (
    build_model,
    compile_or_eager,
    is_compiled,
    resolve_precision,
    set_frozen,
    training_setup,
)
from planet_batch.tracking import Run
from planet_batch.training.state import UNREADABLE, History, Position, TrainState, next_position, schedule
from planet_batch.training.steps import (
    EpochShare,
    compile_training,
    epoch_metrics,
    evaluate,
    fold_prefix,
    format_row,
    gather,
    started,
    table_header,
    train_one_epoch,
    warm_up_step,
)

log = logging.getLogger("planet_batch.training.train")  # one logger for the run's console lines (docs/console.md)


class Reports:
    """A worker's epoch reports to Ray Train; rank 0's carries the checkpoint, uploaded in the background
    (`CheckpointUploadMode.ASYNC`) while the next epoch trains.

    Ray Train registers a checkpoint once its upload is done and every worker's report of that epoch is in (its
    controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker lost before that would take
    its report with it. So each worker waits for the registration (`registered`), but one epoch late: just before
    its next report, when the upload and the poll are long over, and at the run's last epoch. Waiting at once
    would stall every rank each epoch for the copy to storage (S3: the whole model and optimiser state). The
    price: a worker lost in the seconds between an epoch's end and its registration resumes from the epoch
    before. Rank 0 logs an epoch to MLflow only once registered (`Worker.track`), so either way each epoch is in
    metrics.csv and MLflow once.

    Local mode (`local_dir`) keeps a reference to a folder of its own instead of uploading, and has no other
    worker to wait for."""

    def __init__(self, local_dir: str | None):
        self.local_dir = local_dir
        self.pending = False  # a report Ray may not have registered yet

    def report(self, metrics: dict, state: TrainState | None) -> None:
        import ray.train

        checkpoint = None
        if state is not None:  # local mode's folder is kept; a temporary one is Ray's to delete once uploaded
            d = Path(self.local_dir) / f"checkpoint_{metrics['step']:06d}" if self.local_dir else \
                Path(tempfile.mkdtemp(prefix="planet-batch-checkpoint-"))
            d.mkdir(parents=True, exist_ok=True)
            state.save(d)
            checkpoint = ray.train.Checkpoint.from_directory(str(d))
        if self.local_dir:
            ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            self.pending = True

    def registered(self) -> None:
        """Wait until Ray Train has registered every report so far (at once when it has)."""
        import ray.train

        if not self.pending:
            return
        t0 = time.perf_counter()
        ray.train.get_all_reported_checkpoints()
        self.pending = False
        log.debug("Ray registered the last report after %.2f s", time.perf_counter() - t0)


def run_seconds(epochs: list[dict]) -> float:
    """The seconds of a run's epochs (training and validation), without its start-up."""
    return round(sum(e["time"] for e in epochs), 1)


def restore(rank: int, fold: str = "") -> TrainState | None:
    """The state to resume from: Ray Train's latest checkpoint, or when that one cannot be read (a disk that filled,
    a partial upload), the newest of the others Ray kept that can (it keeps each stage's end and at least the
    epoch before the latest: train.fit_run), with one warning; None for a fresh run (or, with a warning, when no
    checkpoint can be read)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    try:
        return TrainState.from_checkpoint(latest)
    except UNREADABLE as e:
        problem = first_line(e)
    older = sorted((r for r in ray.train.get_all_reported_checkpoints() if r.checkpoint.path != latest.path),
                   key=lambda r: r.metrics.get("step", 0), reverse=True)
    for reported in older:
        try:
            state = TrainState.from_checkpoint(reported.checkpoint)
        except UNREADABLE:
            continue
        if rank == 0:
            log.warning("%sthe latest checkpoint (%s) cannot be read (%s): resuming from the one of epoch %d, %s",
                        fold_prefix(fold), latest.path, problem, reported.metrics.get("epoch", -1),
                        reported.checkpoint.path)
        return state
    if rank == 0:
        log.warning("%sno checkpoint of this run can be read (the latest, %s: %s): starting the run over",
                    fold_prefix(fold), latest.path, problem)
    return None


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker of a run is given (through Ray Train's `train_loop_config`), made once by the driver."""

    cfg: TrainConfig
    init: Any  # ObjectRef of the first stage's weights (the object store: no shared disk needed)
    start_files: dict[str, Any]  # stage name -> ObjectRef of the saved stage file (.pt) it starts from
    kept_stages: tuple[str, ...]  # stages a later stage starts from: their final weights travel in checkpoints
    normalization: Normalization
    steps_per_epoch: int
    threads: int
    local_checkpoints: str | None  # local mode's checkpoint folders (run_folder.local_checkpoints)
    verbose: bool
    fold: str  # a K-fold run's fold, for its console lines
    tracking: Run | None = None  # the MLflow run rank 0 logs the epochs into


@dataclass(frozen=True)
class EpochResult:
    """One epoch over the whole group: fastai's table row and the validation pass it was computed on."""

    metrics: dict
    losses: list[float]  # this worker's batch losses
    probs: np.ndarray  # every worker's validation probabilities
    targets: np.ndarray


class Worker:
    """One Ray Train worker's run: every stage of the config, each fastai's `fit_one_cycle`, from Ray's latest
    checkpoint if there is one (a restarted worker group, or a resumed run). One method a step."""

    def __init__(self, plan: WorkerPlan):
        import ray.train
        import ray.train.torch

        self.plan, self.cfg, self.fold = plan, plan.cfg, plan.fold
        self.rank = ray.train.get_context().get_world_rank()
        torch.set_num_threads(plan.threads)
        torch.manual_seed(self.cfg.seed + self.rank)
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(self.cfg.precision, self.device)  # on this worker's own hardware
        self.history = History()
        self.kept: dict[str, dict] = {}  # final weights of the stages a later stage starts from
        self.prefetcher = ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
        self.reports = Reports(plan.local_checkpoints)
        self.raw = self.model = self.setup = None
        self.compiled = False

    def run(self) -> None:
        saved = restore(self.rank, self.fold)
        start = self.resume_position(saved)
        if start.stage == len(self.cfg.stages):
            return
        # The first epoch's data pipeline starts before the model is built, so that its start-up (~4 s on 2 CPUs)
        # overlaps the worker's import of the body's library (timm: ~2.5 s) instead of following it.
        upcoming = self.prefetcher.submit(self.start_epoch, start.stage)
        self.build(saved)
        for pos in schedule(self.cfg.stages, start):
            if pos.epoch == 0 or pos == start:
                self.begin_stage(pos, saved if pos == start and start.epoch > 0 else None)
            batches = upcoming.result()
            after = next_position(self.cfg.stages, pos)
            upcoming = self.run_epoch(pos, batches, after)
        self.prefetcher.shutdown()

    def resume_position(self, saved: TrainState | None) -> Position:
        """Where to start: the first epoch, or the one after the checkpoint's (its history goes on)."""
        if saved is None:
            return Position(0, 0)
        self.history, self.kept, done = saved.history, saved.kept, saved.done
        stage = self.cfg.stages[done.stage]
        self.history.resumed_after.append((stage.name, done.epoch))
        start = next_position(self.cfg.stages, done)
        if self.rank == 0:
            if start.stage < len(self.cfg.stages):
                log.info("%sresuming %s at epoch %d (the checkpoint of %s epoch %d)", fold_prefix(self.fold),
                         self.cfg.stages[start.stage].name, start.epoch, stage.name, done.epoch)
            else:
                log.info("%severy stage is finished (the checkpoint of %s epoch %d): nothing left to train",
                         fold_prefix(self.fold), stage.name, done.epoch)
        return start

    def build(self, saved: TrainState | None) -> None:
        """The model, with the run's initial weights or the checkpoint's."""
        import ray

        self.raw = build_model(self.cfg.arch, len(TAGS), weights="none", dropout=self.cfg.dropout)
        self.raw.load_state_dict(saved.model if saved is not None else ray.get(self.plan.init))
        if self.rank == 0:  # once per worker group: the workers of a group run on alike hardware
            log.info("%s%d worker(s): %s, %s", fold_prefix(self.fold), max(1, self.cfg.workers), self.device.type,
                     self.precision)

    def begin_stage(self, pos: Position, saved: TrainState | None) -> None:
        """A stage's model (its frozen groups, its own data-parallel wrapper), optimiser and one-cycle schedule;
        `saved`: resuming mid-stage, their state from the checkpoint."""
        import ray
        import ray.train.torch

        stage = self.cfg.stages[pos.stage]
        if pos.epoch == 0 and pos.stage > 0 and stage.start_from is not None:
            start = self.kept.get(stage.start_from)
            self.raw.load_state_dict(start if start is not None else ray.get(self.plan.start_files[stage.name]))
        set_frozen(self.raw, stage.frozen)
        steps = self.plan.steps_per_epoch * stage.epochs
        # A data-parallel wrapper per stage: DDP reduces the gradients of the parameters that were trainable when
        # it was made. The previous stage's goes first, with its gradient hooks.
        self.model = None
        gc.collect()
        model = ray.train.torch.prepare_model(self.raw)
        if compile_training(self.cfg.compile, self.device, steps):  # the export keeps `raw`'s weights
            model.train()
            model = compile_or_eager(model, warm_up_step(self.cfg.batch_size, stage.size, self.device,
                                                         self.precision))
        self.model, self.compiled = model, is_compiled(model)
        self.setup = training_setup(self.raw, stage.lr, self.cfg.weight_decay, steps)
        if saved is not None:
            self.setup.optimizer.load_state_dict(saved.optimizer)
            self.setup.scheduler.load_state_dict(saved.scheduler)
        if self.rank == 0:
            line = (f"{fold_prefix(self.fold)}stage {stage.name}: {'frozen' if stage.frozen else 'unfrozen'}, "
                    f"size {stage.size}, lr {stage.lr}, {'compiled' if self.compiled else 'eager'}")
            # A fold's or a trial's table header is a line of its own, with the logger's name: Ray folds alike
            # lines of runs side by side unless they carry it (cli.console_log_rules).
            for text in ([line, table_header(self.fold)] if self.fold else [f"{line}\n{table_header()}"]):
                log.info("%s", text)

    def start_epoch(self, stage_index: int) -> Iterator:
        """The stage's training batches for one epoch, their pipeline already started."""
        import ray.train

        size = self.cfg.stages[stage_index].size
        shard = ray.train.get_dataset_shard(f"train_{size}")
        return started(shard.iter_torch_batches(
            batch_size=self.cfg.batch_size, drop_last=True, device=self.device, prefetch_batches=2,
            local_shuffle_buffer_size=4 * self.cfg.batch_size, pin_memory=self.device.type == "cuda"))

    def run_epoch(self, pos: Position, batches: Iterator, after: Position) -> Iterator | None:
        """Train, validate, record, track, report; returns the next epoch's batches, already starting."""
        t0 = time.perf_counter()
        losses, wait = self.train(pos, batches)
        train_seconds = time.perf_counter() - t0
        # Ray Data restarts the pipeline every epoch (~2 s before the first batch on 2 CPUs): start the next one
        # now, so that start-up overlaps validation instead of training (the next stage's data at a boundary).
        upcoming = self.prefetcher.submit(self.start_epoch, after.stage) \
            if after.stage < len(self.cfg.stages) else None
        result = self.validate(pos, losses, EpochShare.of_training(losses, train_seconds, wait), t0)
        self.record(pos, result)
        self.reports.registered()  # the previous epoch's report, registered while this one trained
        self.track()
        # tests' fault point: a worker lost here, past the registration, resumes from the previous epoch, always
        maybe_inject_fault(f"train:{self.cfg.stages[pos.stage].name}:{pos.epoch}:report:{self.rank}")
        self.report(pos, result)
        if after.stage == len(self.cfg.stages):
            self.reports.registered()  # the run's last: the driver exports from it
        return upcoming

    def train(self, pos: Position, batches: Iterator) -> tuple[list[float], float]:
        """One pass over this worker's batches: its batch losses and the seconds it waited for input."""
        stage = self.cfg.stages[pos.stage]
        # fastai's progress bar as lines, on rank 0: an epoch over a minute says how it goes every 30 s
        progress = ProgressLine("images", self.plan.steps_per_epoch * self.cfg.batch_size, every_s=30,
                                label=f"{fold_prefix(self.fold, '')}{stage.name} epoch {pos.epoch}: ",
                                longer_than_s=60) if self.rank == 0 else None
        return train_one_epoch(self.model, batches, self.setup, self.device, self.plan.normalization,
                               f"train:{stage.name}:{pos.epoch}:{{batch}}:{self.rank}", self.precision, progress)

    def validate(self, pos: Position, losses: list[float], share: EpochShare, t0: float) -> EpochResult:
        """This worker's validation slice, gathered with every other worker's into the epoch's metrics."""
        import ray.train

        stage = self.cfg.stages[pos.stage]
        valid = ray.train.get_dataset_shard(f"valid_{stage.size}_{self.rank}")
        probs, targets, loss_sum = evaluate(self.raw, valid, self.cfg.batch_size, self.device,
                                            self.plan.normalization, self.precision, self.cfg.valid_tta)
        shares = gather(replace(share, probs=probs, targets=targets, valid_loss_sum=loss_sum))
        probs = np.concatenate([s.probs for s in shares])
        targets = np.concatenate([s.targets for s in shares])
        metrics = epoch_metrics(shares, probs, targets, stage, pos.epoch, self.cfg, time.perf_counter() - t0) | {
            "precision": self.precision, "compiled": self.compiled}
        return EpochResult(metrics, losses, probs, targets)

    def record(self, pos: Position, result: EpochResult) -> None:
        """The epoch into the run's history; a stage's final weights kept where a later stage starts from them."""
        stage = self.cfg.stages[pos.stage]
        self.history.epochs.append(result.metrics)
        self.history.batch_losses.extend(result.losses)
        if pos.epoch == stage.epochs - 1 and stage.name in self.plan.kept_stages:
            self.kept[stage.name] = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}

    def report(self, pos: Position, result: EpochResult) -> None:
        """The table row and, from rank 0, the checkpoint: everything a resumed run needs to go on."""
        stage_end = pos.epoch == self.cfg.stages[pos.stage].epochs - 1
        state = None
        if self.rank == 0:
            log.info("%s", format_row(result.metrics, self.fold))
            # a stage's end keeps its validation pass: the export tunes thresholds on the last stage's
            state = TrainState(self.raw.state_dict(), self.setup.optimizer.state_dict(),
                               self.setup.scheduler.state_dict(), pos, self.history, self.kept, to_dict(self.cfg),
                               result.probs if stage_end else None, result.targets if stage_end else None)
        # One global step across stages, and the seconds of every epoch so far (a search's table: tune.py)
        run = {"step": len(self.history.epochs), "stage_end": int(stage_end),
               "epoch_seconds": run_seconds(self.history.epochs)}
        lost = {"tracking_lost": int(self.plan.tracking.lost)} if self.rank == 0 and self.plan.tracking else {}
        self.reports.report(result.metrics | run | lost, state)

    def track(self) -> None:
        """Rank 0: the epochs Ray holds the checkpoint of into the MLflow run, so that a restart never repeats a
        logged epoch: all but this one. The run's last epoch is the driver's to log; each attempt here is followed
        by a report that tells the driver whether the server was lost (one warning per job)."""
        if self.rank == 0 and self.plan.tracking:
            self.plan.tracking.log_epochs(self.history.epochs[:-1])


def train_loop(config: dict) -> None:
    """`train_loop_per_worker`: the whole config in one Ray Train run; `config["plan"]`: its WorkerPlan."""
    plan: WorkerPlan = config["plan"]
    setup_logging(plan.verbose)
    if not plan.verbose:
        # Ray Train sets the worker's root logger to INFO, where its per-report lines ("Reporting training
        # result ...", on a logger named by file path, so its LoggingConfig misses them) reach the console.
        logging.getLogger().setLevel(logging.WARNING)
    Worker(plan).run()
