"""The lesson-3 recipe as data-parallel Ray Train: stages of fit_one_cycle, checkpoints, resume, export.

Each stage is one `TorchTrainer.fit()` (fastai's `fit_one_cycle` call). Workers only
report metrics and checkpoints to Ray; the driver writes the run folder from the final
checkpoint of each stage, so a stage that resumed after a failure still leaves exactly
its planned epochs in metrics.csv.
"""

from __future__ import annotations

import csv
import itertools
import logging
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planet_batch.config import Stage, TrainConfig, from_dict, save_config, to_dict
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
                    fault_point: str, precision: str = "fp32") -> tuple[list[float], float]:
    # `fault_point` names this epoch for tests' fault injection, with `{batch}` for the batch index.
    """One pass over this worker's batches; the per-batch losses and the seconds spent waiting for input.
    With precision "bf16" the forward pass runs under bf16 autocast (weights, gradients and the optimiser
    stay fp32)."""
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


def restore(checkpoint, model: nn.Module, setup: TrainingSetup) -> tuple[int, dict]:
    """The epoch to start at and the history so far: 0 and an empty history, or the checkpoint's."""
    history: dict = {"epochs": [], "batch_losses": [], "resumed_after": []}
    if checkpoint is None:
        return 0, history
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    history = state["history"]
    history["resumed_after"].append(state["epoch"])
    return state["epoch"] + 1, history


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
        d = Path(local_dir) / f"checkpoint_{metrics['epoch']:06d}"
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


def train_stage_loop(config: dict) -> None:
    """`train_loop_per_worker`: one stage's epochs, resuming from Ray's latest checkpoint if there is one."""
    import ray
    import ray.train
    import ray.train.torch

    setup_logging(config["verbose"])
    if not config["verbose"]:
        # Ray Train sets the worker's root logger to INFO, where its per-report lines ("Reporting training
        # result ...", on a logger named by file path, so its LoggingConfig misses them) reach the console.
        logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(TrainConfig, config["cfg"])
    stage = cfg.stages[config["stage_index"]]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.precision, device)  # on this worker's own hardware
    steps = config["steps_per_epoch"] * stage.epochs

    raw = build_model(cfg.arch, len(TAGS), weights="none", dropout=cfg.dropout)
    raw.load_state_dict(ray.get(config["init"]))  # via the object store: no shared disk needed
    set_frozen(raw, stage.frozen)
    model = ray.train.torch.prepare_model(raw)
    if compile_training(cfg.compile, device, steps):  # the export keeps `raw`'s weights: never a compiled artifact
        model.train()
        model = compile_or_eager(model, warm_up_step(cfg.batch_size, stage.size, device, precision))
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    log.info("%sworker %d: %s, %s, %s", f"{config['fold']} " if config["fold"] else "", rank, device, precision,
             "compiled" if compiled else "eager")
    setup = training_setup(raw, stage.lr, cfg.weight_decay, steps)
    start, history = restore(ray.train.get_checkpoint(), raw, setup)
    if rank == 0:
        if history["resumed_after"]:
            log.info("stage %s: resumed from the checkpoint of epoch %d", stage.name, start - 1)
        log.info("%sstage %s: %s, size %d, lr %s\n%s", f"{config['fold']}: " if config["fold"] else "", stage.name,
                 "frozen" if stage.frozen else "unfrozen", stage.size, stage.lr, table_header(config["fold"]))

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard(f"valid_{rank}")

    def start_epoch():
        return started(train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, device=device, prefetch_batches=2,
            local_shuffle_buffer_size=4 * cfg.batch_size))

    prefetcher = ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
    upcoming = None
    for epoch in range(start, stage.epochs):
        t0 = time.perf_counter()
        batches = upcoming.result() if upcoming is not None else start_epoch()
        losses, wait = train_one_epoch(model, batches, setup, device, config["normalization"],
                                       f"train:{stage.name}:{epoch}:{{batch}}:{rank}", precision)
        train_seconds = time.perf_counter() - t0
        if epoch + 1 < stage.epochs:
            # Ray Data restarts the pipeline every epoch (~2 s before the first batch on 2 CPUs):
            # start the next one now, so that start-up overlaps validation instead of training.
            upcoming = prefetcher.submit(start_epoch)
        shares = gather(EpochShare(*evaluate(raw, valid_shard, cfg.batch_size, device, config["normalization"],
                                             precision),
                                   float(np.sum(losses)),
                                   len(losses), train_seconds, wait))
        probs = np.concatenate([s.probs for s in shares])
        targets = np.concatenate([s.targets for s in shares])
        metrics = epoch_metrics(shares, probs, targets, stage, epoch, cfg, time.perf_counter() - t0) | {
            "precision": precision, "compiled": compiled}
        history["epochs"].append(metrics)
        history["batch_losses"].extend(losses)
        state = None
        if rank == 0:
            log.info("%s", format_row(metrics, config["fold"]))
            state = {"model": raw.state_dict(), "optimizer": setup.optimizer.state_dict(),
                     "scheduler": setup.scheduler.state_dict(), "epoch": epoch, "history": history,
                     "config": config["cfg"]}
            if epoch == stage.epochs - 1:  # the export tunes thresholds on these
                state["valid_probs"], state["valid_targets"] = torch.from_numpy(probs), torch.from_numpy(targets)
        save_and_report(metrics, state, config["local_checkpoints"])
    prefetcher.shutdown()


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


def stage_datasets(train: Split, valid: Split, size: int, world: int,
                   label_selector: dict[str, str] | None = None) -> dict:
    """`train` (augmented, split across workers by Ray Train) and `valid_R`, worker R's slice of `valid`.

    Validation is not augmented, so it is decoded once per stage and kept in the object store
    (20% of the chips at 128 px is ~0.4 GB) instead of restarting a decoding pipeline every
    epoch, which left the workers idle for its start-up and took the CPU that the next
    epoch's training data needed.
    """
    datasets = {"train": labelled_dataset(train, size, augment=True, label_selector=label_selector)}
    for r in range(world):  # together the slices cover every validation image once
        part = labelled_dataset(valid.part(slice(r, None, world)), size, augment=False, label_selector=label_selector)
        datasets[f"valid_{r}"] = part.materialize()
    return datasets


def fit_stage(cfg: TrainConfig, index: int, init: dict, train: Split, valid: Split, storage: str,
              run_id: str, label_selector: dict[str, str] | None = None, fold: str = "") -> dict:
    """Run one stage on Ray Train and return the state in its final checkpoint."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage = cfg.stages[index]
    world = max(1, cfg.workers)
    datasets = stage_datasets(train, valid, stage.size, world, label_selector)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.gpu else {})
    trainer = TorchTrainer(
        train_stage_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "stage_index": index,
            "init": ray.put(init),
            "normalization": normalization(cfg.arch),
            "steps_per_epoch": (len(train) // world) // cfg.batch_size,
            "threads": torch_threads(cfg.torch_threads, cfg.cpus_per_worker),
            "local_checkpoints": None if cfg.workers else str(Path(storage) / f"{run_id}-{stage.name}"),
            "verbose": verbose(),
            "fold": fold,
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker=resources if cfg.workers else None,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=f"{run_id}-{stage.name}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own console lines (worker group start, checkpoint created, ...) at WARNING unless
            # --verbose; its system log files in the session folder keep every level.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
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
        raise TrainError(f"stage {stage.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)


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


@dataclass
class RunLog:
    """What the run folder shows across stages: metrics.csv rows and the loss curve of losses.png."""

    rows: list[dict] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    epoch_ends: list[int] = field(default_factory=list)  # batch index at which each epoch ended

    def add_stage(self, history: dict) -> None:
        self.rows.extend(history["epochs"])
        per_epoch = len(history["batch_losses"]) // max(1, len(history["epochs"]))
        self.epoch_ends.extend(len(self.batch_losses) + (k + 1) * per_epoch for k in range(len(history["epochs"])))
        self.batch_losses.extend(history["batch_losses"])


def check_start_files(cfg: TrainConfig) -> None:
    for i, st in enumerate(cfg.stages):
        if st.start_from and st.start_from.endswith(".pt") and not Path(st.start_from).is_file():
            raise TrainError(f"stages[{i}].start_from: {st.start_from} does not exist")


def save_stage(run_dir: Path, cfg: TrainConfig, stage: Stage, state: dict) -> Path:
    """RUN_DIR/stages/NAME.pt: the stage's final weights, which a later config can `start_from`."""
    path = run_dir / "stages" / f"{stage.name}.pt"
    write_atomic(path, lambda p: torch.save(
        {"model": state["model"], "arch": cfg.arch, "stage": stage.name, "size": stage.size,
         "config": to_dict(cfg), "metrics": state["history"]["epochs"][-1],
         "resumed_after": state["history"]["resumed_after"]}, p))
    log.info("stage %s saved to %s", stage.name, path)
    return path


def export_run(run_dir: Path, cfg: TrainConfig, state: dict, last_row: dict, fold: str = "") -> Path:
    """RUN_DIR/export: the final weights with thresholds tuned for F2 on the last validation pass."""
    probs, targets = state["valid_probs"].numpy(), state["valid_targets"].numpy()
    thresholds = tune_thresholds(probs, targets, start=cfg.threshold)
    final = {**last_row, "fbeta_tuned": fbeta(probs, targets, thresholds),
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
    """Train every stage of `cfg` on the dataset at `data_root`; returns the export folder.
    `split`: the (train, validation) images, by default the config's seeded valid_pct split; `fold` names a
    K-fold run's fold in its console lines (planet_batch.folds)."""
    from planet_batch.plots import plot_losses

    run_dir = Path(run_dir).resolve()
    data = locate(data_root)
    train, valid = split or train_valid_split(data, cfg.valid_pct, cfg.seed)  # bad labels fail here, before Ray
    check_batches(cfg, len(train))
    check_start_files(cfg)
    weights = initial_state(cfg)
    ensure_ray()
    if not cfg.autoscale:
        check_capacity(cfg.workers, cfg.cpus_per_worker, cfg.gpu)
    quiet_data_progress()
    reads = read_placement(data, cfg.data_shared)
    save_config(cfg, run_dir / "config.yaml")
    storage = cfg.storage or str(run_dir / "ray")
    run_id = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log.info("%straining %s on %d images (%d held out) with %d worker(s); run folder %s",
             f"{fold}: " if fold else "", cfg.arch, len(train), len(valid), cfg.workers, run_dir)

    finished: dict[str, dict] = {}  # stage name -> final weights
    run_log = RunLog()
    state: dict = {}
    for i, stage in enumerate(cfg.stages):
        if i > 0 and stage.start_from is not None:
            weights = finished.get(stage.start_from) or load_stage_file(stage.start_from)
        state = fit_stage(cfg, i, weights, train, valid, storage, run_id, reads, fold)
        weights = finished[stage.name] = state["model"]
        run_log.add_stage(state["history"])
        save_stage(run_dir, cfg, stage, state)
        write_metrics(run_dir, run_log.rows)

    plot_losses(run_log.batch_losses, run_log.epoch_ends, [r["valid_loss"] for r in run_log.rows],
                run_dir / "losses.png")
    return export_run(run_dir, cfg, state, run_log.rows[-1], fold)
