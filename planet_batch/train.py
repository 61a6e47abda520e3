"""The lesson-3 recipe as data-parallel Ray Train: stages of fit_one_cycle, checkpoints, resume, export.

A training job is one `TorchTrainer.fit()`: its workers go through the config's stages (each fastai's
`fit_one_cycle` call), switching to the stage's data at the boundary. Workers only report metrics and
checkpoints to Ray; the driver writes the run folder from the checkpoints Ray kept, so a run that resumed
(after a lost worker, or a lost driver: the same command again) leaves exactly its planned epochs in
metrics.csv.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import itertools
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planet_batch.config import HOW_NOT_WHAT, Stage, TrainConfig, from_dict, load_config, save_config, to_dict
from planet_batch.data import Split, labelled_dataset, train_valid_split
from planet_batch.errors import PlanetBatchError
from planet_batch.export import save_export
from planet_batch.labels import TAGS
from planet_batch.metrics import accuracy_thresh, best_constant_fbeta, fbeta, tune_thresholds
from planet_batch.model import (
    TrainingSetup,
    build_model,
    compile_or_eager,
    inference,
    normalization,
    resolve_precision,
    set_frozen,
    training_setup,
)
from planet_batch.runtime import (
    ProgressLine,
    check_capacity,
    ensure_ray,
    maybe_inject_fault,
    quiet_data_progress,
    setup_logging,
    torch_threads,
    verbose,
)
from planet_batch.storage import locate, read_placement, write_atomic
from planet_batch.transforms import Normalization, to_model_input

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("stage", "epoch", "train_loss", "valid_loss", "accuracy_thresh", "fbeta", "time", "precision",
                  "compiled")


class TrainError(PlanetBatchError, RuntimeError):
    pass


def format_row(m: dict, fold: str = "") -> str:
    secs = int(round(m["time"]))
    return (f"{fold:<8}" if fold else "") + (f"{m['epoch']:<6d}{m['train_loss']:<12.6f}{m['valid_loss']:<12.6f}"
            f"{m['accuracy_thresh']:<17.6f}{m['fbeta']:<10.6f}{secs // 60:02d}:{secs % 60:02d}")


def table_header(fold: str = "") -> str:
    """fastai's epoch table; K-fold runs name the fold in a first column, as their folds' lines interleave."""
    return (f"{'fold':<8}" if fold else "") + TABLE_HEADER


TABLE_HEADER = f"{'epoch':<6}{'train_loss':<12}{'valid_loss':<12}{'accuracy_thresh':<17}{'fbeta':<10}time"


# ----------------------------------------------------------------------------------------------
# Inside each Ray Train worker


@dataclass
class EpochShare:
    """One worker's part of an epoch, gathered to every rank to make the epoch's metrics."""

    probs: np.ndarray  # validation probabilities of this worker's slice
    targets: np.ndarray
    valid_loss_sum: float  # summed per-image BCE over the slice
    train_loss_sum: float  # summed per-batch training loss
    train_batches: int
    train_seconds: float
    data_wait_s: float  # time spent waiting for input batches


def gather(share: EpochShare) -> list[EpochShare]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, share)
        return out
    return [share]


def evaluate(model: nn.Module, shard, batch_size: int, device, norm: Normalization,
             precision: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Sigmoid probabilities, targets and summed per-image BCE over one validation shard."""
    probs, targets, loss_sum = [], [], 0.0
    model.eval()
    with inference(device, precision):
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            logits = model(to_model_input(batch["image"], device, norm)).float()
            y = batch["target"].float()
            loss_sum += nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum().item()
            probs.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(y.cpu().numpy())
    empty = np.zeros((0, len(TAGS)), np.float32)
    return (np.concatenate(probs) if probs else empty), (np.concatenate(targets) if targets else empty), loss_sum


def started(batches: Iterable) -> Iterator:
    """`batches` as an iterator whose first item has been fetched, so its pipeline is running."""
    it = iter(batches)
    first = next(it, None)
    return it if first is None else itertools.chain([first], it)


def train_one_epoch(model: nn.Module, batches: Iterator, setup: TrainingSetup, device, norm: Normalization,
                    fault_point: str, precision: str = "fp32",
                    progress: ProgressLine | None = None) -> tuple[list[float], float]:
    # `fault_point` names this epoch for tests' fault injection, with `{batch}` for the batch index.
    """One pass over this worker's batches; the per-batch losses and the seconds spent waiting for input.
    With precision "bf16" the forward pass runs under bf16 autocast (weights, gradients and the optimiser
    stay fp32). `progress` counts this worker's images, with the running loss."""
    model.train()
    amp = precision == "bf16"
    losses, wait, t_wait = [], 0.0, time.perf_counter()
    scheduler = setup.scheduler
    for b, batch in enumerate(batches):
        wait += time.perf_counter() - t_wait
        maybe_inject_fault(fault_point.format(batch=b))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(to_model_input(batch["image"], device, norm))
        loss = setup.loss_fn(logits.float(), batch["target"].float())
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        if scheduler.last_epoch + 1 < scheduler.total_steps:  # a short last shard must not overrun the cycle
            scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(len(batch["target"]), f"loss {sum(losses) / len(losses):.4f}")
        t_wait = time.perf_counter()
    return losses, wait


# torch.compile for training steps. Measured on the 2-core EPYC (resnet18@128, batch 32, 2 threads, forward +
# backward + AdamW): compiling took 26-34 s and the compiled step was *slower* (bf16 78.2 vs 87.8 img/s eager,
# fp32 48.4 vs 51.7), so auto never compiles training on a CPU. On a GPU auto compiles stages of at least this
# many steps per worker (not measured here: no GPU was available; compile time there is typically ~1 min).
TRAIN_COMPILE_MIN_STEPS = 2_000


def compile_training(requested: str, device: torch.device, steps: int) -> bool:
    if requested != "auto":
        return requested == "on"
    return device.type == "cuda" and steps >= TRAIN_COMPILE_MIN_STEPS


def warm_up_step(batch_size: int, size: int, device, precision: str) -> Callable[[nn.Module], None]:
    """A forward and backward pass on zeros that compiles the training graph, leaving the model as it was:
    batch-norm statistics restored, no gradients kept."""
    def run(model: nn.Module) -> None:
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        x = torch.zeros(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x).float().sum().backward()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        model.zero_grad(set_to_none=True)
    return run


def epoch_metrics(shares: list[EpochShare], probs: np.ndarray, targets: np.ndarray, stage: Stage, epoch: int,
                  cfg: TrainConfig, seconds: float) -> dict:
    """fastai's epoch row over the whole validation set (`probs`, `targets`: every worker's slice)."""
    batches = sum(s.train_batches for s in shares)
    return {
        "stage": stage.name,
        "epoch": epoch,
        "train_loss": sum(s.train_loss_sum for s in shares) / max(1, batches),
        "valid_loss": sum(s.valid_loss_sum for s in shares) / max(1, len(probs)),
        "accuracy_thresh": accuracy_thresh(probs, targets, cfg.threshold),
        "fbeta": fbeta(probs, targets, cfg.threshold),
        "time": seconds,
        # Training images per second of the whole group, excluding validation (bench/train_throughput.py).
        "train_images_per_s": batches * cfg.batch_size / max(s.train_seconds for s in shares),
        "data_wait_s": max(s.data_wait_s for s in shares),  # the slowest worker's wait for input
    }


def save_and_report(metrics: dict, state: dict | None, local_dir: str | None) -> None:
    """Report the epoch to Ray Train (rank 0 with the checkpoint), then wait until Ray has registered it.

    Ray Train registers a checkpoint once every worker's report of that epoch is in, which its
    controller collects every 2 s. Without the wait, a worker that died soon after its report
    could take the report with it and the restart resumed an epoch earlier; with it, a restart
    always resumes from the last epoch every worker finished (the cost: about 1 s per epoch).
    """
    import ray.train

    if state is None:
        ray.train.report(metrics)
    elif local_dir:  # local mode keeps a reference to the folder instead of copying it to storage
        d = Path(local_dir) / f"checkpoint_{metrics['step']:06d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(state, d / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    if not local_dir:
        t0 = time.perf_counter()
        ray.train.get_all_reported_checkpoints()
        log.debug("epoch %d: Ray registered the report after %.2f s", metrics["epoch"], time.perf_counter() - t0)


def read_state(checkpoint) -> dict:
    """The training state a checkpoint holds (tensors and plain data only: `weights_only`)."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Position:
    """Where a run goes on: a stage of the config and the epoch within it."""

    stage: int
    epoch: int


def schedule(stages: tuple[Stage, ...], start: Position) -> list[Position]:
    """Every (stage, epoch) of the config from `start` on, in order."""
    every = [Position(i, e) for i, st in enumerate(stages) for e in range(st.epochs)]
    return every[every.index(start):] if start in every else []


def next_position(stages: tuple[Stage, ...], done: Position) -> Position:
    """The epoch after `done` (the stage's next, or the next stage's first)."""
    if done.epoch + 1 < stages[done.stage].epochs:
        return Position(done.stage, done.epoch + 1)
    return Position(done.stage + 1, 0)


class Worker:
    """One Ray Train worker's run: every stage of the config, each fastai's `fit_one_cycle`, from Ray's latest
    checkpoint if there is one (a restarted worker group, or a resumed run). One method a step."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch

        self.config, self.cfg = config, from_dict(TrainConfig, config["cfg"])
        self.fold = config["fold"]
        self.rank = ray.train.get_context().get_world_rank()
        torch.set_num_threads(config["threads"])
        torch.manual_seed(self.cfg.seed + self.rank)
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(self.cfg.precision, self.device)  # on this worker's own hardware
        self.history: dict = {"epochs": [], "batch_losses": [], "resumed_after": []}
        self.kept: dict[str, dict] = {}  # final weights of the stages a later stage starts from
        self.prefetcher = ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
        self.raw = self.model = self.setup = None
        self.compiled = False

    def run(self) -> None:
        import ray.train

        saved = read_state(c) if (c := ray.train.get_checkpoint()) else None
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

    def resume_position(self, saved: dict | None) -> Position:
        """Where to start: the first epoch, or the one after the checkpoint's (its history goes on)."""
        if saved is None:
            return Position(0, 0)
        self.history, self.kept = saved["history"], saved["kept"]
        done = Position(saved["stage"], saved["epoch"])
        stage = self.cfg.stages[done.stage]
        self.history["resumed_after"].append([stage.name, done.epoch])
        start = next_position(self.cfg.stages, done)
        if self.rank == 0:
            if start.stage < len(self.cfg.stages):
                log.info("%sresuming %s at epoch %d (the checkpoint of %s epoch %d)", self.prefix(":"),
                         self.cfg.stages[start.stage].name, start.epoch, stage.name, done.epoch)
            else:
                log.info("%severy stage is finished (the checkpoint of %s epoch %d): nothing left to train",
                         self.prefix(":"), stage.name, done.epoch)
        return start

    def build(self, saved: dict | None) -> None:
        """The model, with the run's initial weights or the checkpoint's."""
        import ray

        self.raw = build_model(self.cfg.arch, len(TAGS), weights="none", dropout=self.cfg.dropout)
        # (the initial weights come via the object store: no shared disk needed)
        self.raw.load_state_dict(saved["model"] if saved is not None else ray.get(self.config["init"]))

    def prefix(self, sep: str = "") -> str:
        return f"{self.fold}{sep} " if self.fold else ""

    def begin_stage(self, pos: Position, saved: dict | None) -> None:
        """A stage's model (its frozen groups, its own data-parallel wrapper), optimiser and one-cycle schedule;
        `saved`: resuming mid-stage, their state from the checkpoint."""
        import ray
        import ray.train.torch

        stage = self.cfg.stages[pos.stage]
        if pos.epoch == 0 and pos.stage > 0 and stage.start_from is not None:
            start = self.kept.get(stage.start_from)
            self.raw.load_state_dict(start if start is not None else ray.get(self.config["start_files"][stage.name]))
        set_frozen(self.raw, stage.frozen)
        steps = self.config["steps_per_epoch"] * stage.epochs
        # A data-parallel wrapper per stage: DDP reduces the gradients of the parameters that were trainable when
        # it was made. The previous stage's goes first, with its gradient hooks.
        self.model = None
        gc.collect()
        model = ray.train.torch.prepare_model(self.raw)
        if compile_training(self.cfg.compile, self.device, steps):  # the export keeps `raw`'s weights
            model.train()
            model = compile_or_eager(model, warm_up_step(self.cfg.batch_size, stage.size, self.device,
                                                         self.precision))
        self.model, self.compiled = model, isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        self.setup = training_setup(self.raw, stage.lr, self.cfg.weight_decay, steps)
        if saved is not None:
            self.setup.optimizer.load_state_dict(saved["optimizer"])
            self.setup.scheduler.load_state_dict(saved["scheduler"])
        log.info("%sworker %d: %s, %s, %s", self.prefix(), self.rank, self.device, self.precision,
                 "compiled" if self.compiled else "eager")
        if self.rank == 0:
            log.info("%sstage %s: %s, size %d, lr %s\n%s", self.prefix(":"), stage.name,
                     "frozen" if stage.frozen else "unfrozen", stage.size, stage.lr, table_header(self.fold))

    def start_epoch(self, stage_index: int) -> Iterator:
        """The stage's training batches for one epoch, their pipeline already started."""
        import ray.train

        size = self.cfg.stages[stage_index].size
        shard = ray.train.get_dataset_shard(f"train_{size}")
        return started(shard.iter_torch_batches(
            batch_size=self.cfg.batch_size, drop_last=True, device=self.device, prefetch_batches=2,
            local_shuffle_buffer_size=4 * self.cfg.batch_size))

    def run_epoch(self, pos: Position, batches: Iterator, after: Position):
        """Train, validate, report; returns the next epoch's batches, already starting."""
        import ray.train

        stage = self.cfg.stages[pos.stage]
        t0 = time.perf_counter()
        # fastai's progress bar as lines, on rank 0: an epoch over a minute says how it goes every 30 s
        progress = ProgressLine("images", self.config["steps_per_epoch"] * self.cfg.batch_size, every_s=30,
                                label=f"{self.prefix()}{stage.name} epoch {pos.epoch}: ", longer_than_s=60) \
            if self.rank == 0 else None
        losses, wait = train_one_epoch(self.model, batches, self.setup, self.device, self.config["normalization"],
                                       f"train:{stage.name}:{pos.epoch}:{{batch}}:{self.rank}", self.precision,
                                       progress)
        train_seconds = time.perf_counter() - t0
        # Ray Data restarts the pipeline every epoch (~2 s before the first batch on 2 CPUs): start the next one
        # now, so that start-up overlaps validation instead of training (the next stage's data at a boundary).
        upcoming = self.prefetcher.submit(self.start_epoch, after.stage) \
            if after.stage < len(self.cfg.stages) else None
        valid = ray.train.get_dataset_shard(f"valid_{stage.size}_{self.rank}")
        shares = gather(EpochShare(*evaluate(self.raw, valid, self.cfg.batch_size, self.device,
                                             self.config["normalization"], self.precision),
                                   float(np.sum(losses)), len(losses), train_seconds, wait))
        probs = np.concatenate([s.probs for s in shares])
        targets = np.concatenate([s.targets for s in shares])
        stage_end = pos.epoch == stage.epochs - 1
        metrics = epoch_metrics(shares, probs, targets, stage, pos.epoch, self.cfg, time.perf_counter() - t0) | {
            "precision": self.precision, "compiled": self.compiled}
        self.history["epochs"].append(metrics)
        self.history["batch_losses"].extend(losses)
        if stage_end and stage.name in self.config["kept_stages"]:
            self.kept[stage.name] = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}
        state = None
        if self.rank == 0:
            log.info("%s", format_row(metrics, self.fold))
            state = {"model": self.raw.state_dict(), "optimizer": self.setup.optimizer.state_dict(),
                     "scheduler": self.setup.scheduler.state_dict(), "stage": pos.stage, "epoch": pos.epoch,
                     "history": self.history, "kept": self.kept, "config": self.config["cfg"]}
            if stage_end:  # the export tunes thresholds on the last stage's; stages/NAME.pt come from these
                state["valid_probs"], state["valid_targets"] = torch.from_numpy(probs), torch.from_numpy(targets)
        step = len(self.history["epochs"])  # one global step across stages
        save_and_report(metrics | {"step": step, "stage_end": int(stage_end)}, state,
                        self.config["local_checkpoints"])
        return upcoming


def train_loop(config: dict) -> None:
    """`train_loop_per_worker`: the whole config in one Ray Train run."""
    setup_logging(config["verbose"])
    if not config["verbose"]:
        # Ray Train sets the worker's root logger to INFO, where its per-report lines ("Reporting training
        # result ...", on a logger named by file path, so its LoggingConfig misses them) reach the console.
        logging.getLogger().setLevel(logging.WARNING)
    Worker(config).run()


# ----------------------------------------------------------------------------------------------
# In the driver


def load_stage_file(path: Path | str) -> dict:
    """Model weights saved at the end of a stage (RUN_DIR/stages/NAME.pt), tensors only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    except (OSError, KeyError, RuntimeError) as e:
        raise TrainError(f"cannot load saved stage {path}: {e}") from None


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


def kept_stages(cfg: TrainConfig) -> list[str]:
    """The stages of this config that a later stage starts from: their final weights travel in the checkpoints."""
    return sorted({st.start_from for st in cfg.stages if st.start_from and not st.start_file})


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


def local_checkpoints(cfg: TrainConfig, storage: str, name: str) -> str | None:
    """Local mode's checkpoint folders (Ray Train keeps a reference to each instead of copying it to storage)."""
    return None if cfg.workers else str(Path(storage) / name / "local")


def run_name(run_dir: Path) -> str:
    """The Ray Train run of a run folder: the same for every command on that folder (so a new trainer resumes it,
    Ray Train's job-driver fault tolerance), different for another folder sharing the storage."""
    return f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


REPORT_POLL_S = 0.25


def fit_run(cfg: TrainConfig, init: dict, train: Split, valid: Split, storage: str, name: str,
            label_selector: dict[str, str] | None = None, fold: str = ""):
    """Every stage of `cfg` in one Ray Train run (resumed from its latest checkpoint when it exists); Ray's result.

    Every epoch reports a checkpoint; the last epoch of each stage is kept (its weights are `stages/NAME.pt`)
    with the latest one, which Ray Train always keeps and resumes from."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller collects the workers' reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default)
    # and each epoch waits until its report is registered (save_and_report): on the default that cost ~1.3 s an
    # epoch and ~2 s at the end of the run (the demo config: 11 s of its 95 s). Ray passes the variable from the
    # driver to its controller; a value the user set stays.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    world = max(1, cfg.workers)
    datasets = stage_datasets(train, valid, [st.size for st in cfg.stages], world, label_selector)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "init": ray.put(init),
            "start_files": {n: ray.put(w) for n, w in start_files(cfg).items()},
            "kept_stages": kept_stages(cfg),
            "normalization": normalization(cfg.arch),
            "steps_per_epoch": (len(train) // world) // cfg.batch_size,
            "threads": torch_threads(cfg.torch_threads, cfg.cpus_per_worker),
            "local_checkpoints": local_checkpoints(cfg, storage, name),
            "verbose": verbose(),
            "fold": fold,
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker=resources if cfg.workers else None,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ranked by `stage_end` (1 at a stage's last epoch): every stage's last checkpoint and the newest
            # other one stay; the latest is never deleted.
            checkpoint_config=CheckpointConfig(num_to_keep=len(cfg.stages) + 1, checkpoint_score_attribute="stage_end",
                                               checkpoint_score_order="max"),
            # Ray Train's own console lines (worker group start, checkpoint created, ...) at WARNING unless
            # --verbose; its system log files in the session folder keep every level.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train_")]),
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except SystemExit:
        # Ctrl-C (or SIGTERM) while Ray Train runs: its own SIGINT handler aborts the run, and Ray's blocking
        # get then raises SystemExit(1); the CLI says so in one line.
        raise KeyboardInterrupt from None
    finally:
        # fit() leaves its handler installed, and a later Ctrl-C (scoring, in lesson3) would abort the finished
        # run's dead controller and exit 0.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    if result.checkpoint is None:
        raise TrainError(f"run {name} finished without a checkpoint")
    return result


def write_metrics(run_dir: Path, rows: list[dict], columns: tuple[str, ...] = METRIC_COLUMNS) -> Path:
    """RUN_DIR/metrics.csv, atomically: a run's epoch rows (or, for K folds, folds.FOLD_COLUMNS)."""
    def write(p: Path):
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in columns} for r in rows)  # (older runs lack the mode)

    write_atomic(run_dir / "metrics.csv", write)
    return run_dir / "metrics.csv"


def check_batches(cfg: TrainConfig, n_train: int) -> None:
    per_worker = n_train // max(1, cfg.workers)
    if per_worker < cfg.batch_size:
        raise TrainError(
            f"batch_size {cfg.batch_size} is larger than the {per_worker} training images each of "
            f"{max(1, cfg.workers)} workers gets; lower batch_size or workers"
        )


def check_start_files(cfg: TrainConfig) -> None:
    for i, st in enumerate(cfg.stages):
        if st.start_file and not Path(st.start_file).is_file():
            raise TrainError(f"stages[{i}].start_from: {st.start_from} does not exist")


def same_run(a: TrainConfig, b: TrainConfig) -> str | None:
    """None when `a` and `b` train the same model (settings of how a run is carried out may differ), else the first
    field that differs, as `stages[1].epochs: 3 -> 4`."""
    def first_difference(old, new, path: str) -> str | None:
        if isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys():
            return next((d for k in old if (d := first_difference(old[k], new[k], f"{path}.{k}"))), None)
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            return next((d for i, (x, y) in enumerate(zip(old, new)) if (d := first_difference(x, y, f"{path}[{i}]"))),
                        None)
        return None if old == new else f"{path}: {old} -> {new}"

    old, new = to_dict(a), to_dict(b)
    return next((d for k in old if k not in HOW_NOT_WHAT and (d := first_difference(old[k], new[k], k))), None)


def ray_storage(cfg: TrainConfig, run_dir: Path) -> str:
    return cfg.storage or str(run_dir / "ray")


def claim_run_folder(run_dir: Path, cfg: TrainConfig) -> None:
    """A run folder holds one run: the same config goes on where it stopped, another is refused, and
    `overwrite` starts over (the folder's files and its Ray Train run go)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    if cfg.overwrite:
        for path in (run_dir / "stages", run_dir / "export", run_dir / "metrics.csv", run_dir / "losses.png", saved):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        ray_run = locate(ray_storage(cfg, run_dir)) / run_name(run_dir)
        if ray_run.is_dir():
            ray_run.fs.delete_dir(ray_run.path)
        return
    differs = same_run(load_config(TrainConfig, saved), cfg)
    if differs:
        raise TrainError(f"run folder {run_dir} holds a run of another config ({differs}): the same config resumes "
                         "it, --overwrite starts over")


def save_stage(run_dir: Path, cfg: TrainConfig, state: dict) -> Path:
    """RUN_DIR/stages/NAME.pt: the stage's final weights, which a later config can `start_from`."""
    stage = cfg.stages[state["stage"]]
    path = run_dir / "stages" / f"{stage.name}.pt"
    write_atomic(path, lambda p: torch.save(
        {"model": state["model"], "arch": cfg.arch, "stage": stage.name, "size": stage.size,
         "config": to_dict(cfg), "metrics": state["history"]["epochs"][-1],
         "resumed_after": [e for name, e in state["history"]["resumed_after"] if name == stage.name]}, p))
    return path


def write_run_folder(run_dir: Path, cfg: TrainConfig, result) -> dict:
    """stages/NAME.pt from each stage's last checkpoint, metrics.csv and losses.png from the final one (every
    epoch of the run once, however often it resumed); the final state."""
    from ray.train import Checkpoint

    from planet_batch.plots import plot_losses

    local = local_checkpoints(cfg, ray_storage(cfg, run_dir), run_name(run_dir))
    if local is None:
        ends = [c for c, m in result.best_checkpoints if m.get("stage_end")]
    else:  # local mode keeps no ranking: every epoch's checkpoint is a folder of its own
        ends = [Checkpoint.from_directory(d) for d in sorted(Path(local).glob("checkpoint_*"))]
    states = {c.path: read_state(c) for c in ends}
    for state in states.values():
        if "valid_probs" in state:  # (a stage's last epoch)
            log.info("stage %s saved to %s", cfg.stages[state["stage"]].name, save_stage(run_dir, cfg, state))
    # The run's last checkpoint is the last stage's end, read above (a download, with storage on S3)
    final = states.get(result.checkpoint.path) or read_state(result.checkpoint)
    history = final["history"]
    write_metrics(run_dir, history["epochs"])
    per_epoch = len(history["batch_losses"]) // max(1, len(history["epochs"]))
    plot_losses(history["batch_losses"], [(k + 1) * per_epoch for k in range(len(history["epochs"]))],
                [r["valid_loss"] for r in history["epochs"]], run_dir / "losses.png")
    return final


def export_run(run_dir: Path, cfg: TrainConfig, state: dict, fold: str = "") -> Path:
    """RUN_DIR/export: the final weights with thresholds tuned for F2 on the last validation pass."""
    probs, targets = state["valid_probs"].numpy(), state["valid_targets"].numpy()
    thresholds = tune_thresholds(probs, targets, start=cfg.threshold)
    final = {**state["history"]["epochs"][-1], "fbeta_tuned": fbeta(probs, targets, thresholds),
             "best_constant_fbeta": best_constant_fbeta(targets), "n_valid": len(probs)}
    export = save_export(
        run_dir / "export", state["model"], arch=cfg.arch, tags=TAGS, size=cfg.stages[-1].size,
        normalization=normalization(cfg.arch), threshold=cfg.threshold, thresholds=thresholds, dropout=cfg.dropout,
        config=to_dict(cfg), metrics=final,
    )
    log.info("%sfinal: F2 %.4f at %.2f, %.4f with tuned thresholds; best constant prediction %.4f",
             f"{fold}: " if fold else "", final["fbeta"], cfg.threshold, final["fbeta_tuned"],
             final["best_constant_fbeta"])
    return export


def run_training(cfg: TrainConfig, data_root: Path | str, run_dir: Path | str,
                 split: tuple[Split, Split] | None = None, fold: str = "") -> Path:
    """Train every stage of `cfg` on the dataset at `data_root` in one Ray Train run; returns the export folder.
    The same command on the same run folder resumes an interrupted run from its latest checkpoint.
    `split`: the (train, validation) images, by default the config's seeded valid_pct split; `fold` names a
    K-fold run's fold in its console lines (planet_batch.folds)."""
    run_dir = Path(run_dir).resolve()
    data = locate(data_root)
    train, valid = split or train_valid_split(data, cfg.valid_pct, cfg.seed)  # bad labels fail here, before Ray
    check_batches(cfg, len(train))
    check_start_files(cfg)
    claim_run_folder(run_dir, cfg)
    weights = initial_state(cfg)
    ensure_ray()
    if not cfg.autoscale:
        check_capacity(cfg.workers, cfg.cpus_per_worker, cfg.gpu)
    quiet_data_progress()
    reads = read_placement(data, cfg.data_shared)
    save_config(cfg, run_dir / "config.yaml")
    log.info("%straining %s on %d images (%d held out) with %d worker(s); run folder %s",
             f"{fold}: " if fold else "", cfg.arch, len(train), len(valid), cfg.workers, run_dir)
    result = fit_run(cfg, weights, train, valid, ray_storage(cfg, run_dir), run_name(run_dir), reads, fold)
    return export_run(run_dir, cfg, write_run_folder(run_dir, cfg, result), fold)
