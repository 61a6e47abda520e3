"""One epoch's steps on a worker, as torchvision's `train_one_epoch` / `evaluate`, and fastai's epoch table."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from planet_batch.cluster.runtime import ProgressLine, maybe_inject_fault
from planet_batch.config import Stage, TrainConfig
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import Normalization, to_model_input
from planet_batch.model import TrainingSetup, predict_batches
from planet_batch.training.metrics import accuracy_thresh, fbeta


def fold_prefix(fold: str, sep: str = ":") -> str:
    """What starts the console lines of a K-fold job's fold or a search's trial (`fold-2: ...`), as they
    interleave."""
    return f"{fold}{sep} " if fold else ""


def format_row(m: dict, fold: str = "") -> str:
    secs = int(round(m["time"]))
    return first_column(fold, fold) + (f"{m['epoch']:<6d}{m['train_loss']:<12.6f}{m['valid_loss']:<12.6f}"
            f"{m['accuracy_thresh']:<17.6f}{m['fbeta']:<10.6f}{secs // 60:02d}:{secs % 60:02d}")


def table_header(fold: str = "") -> str:
    """fastai's epoch table; the runs of a K-fold job or a search name their run (`fold-2`, `trial-03`) in a first
    column, as their lines interleave."""
    return first_column(fold.split("-")[0], fold) + TABLE_HEADER


def first_column(text: str, fold: str) -> str:
    """The run's column of the table: as wide as its name and a space, at least 8."""
    return f"{text:<{max(8, len(fold) + 1)}}" if fold else ""


TABLE_HEADER = f"{'epoch':<6}{'train_loss':<12}{'valid_loss':<12}{'accuracy_thresh':<17}{'fbeta':<10}time"



@dataclass(frozen=True)
class EpochShare:
    """One worker's part of an epoch, gathered to every rank to make the epoch's metrics."""

    train_loss_sum: float  # summed per-batch training loss
    train_batches: int
    train_seconds: float
    data_wait_s: float  # time spent waiting for input batches
    probs: np.ndarray | None = None  # validation probabilities of this worker's slice
    targets: np.ndarray | None = None
    valid_loss_sum: float = 0.0  # summed per-image BCE over the slice

    @classmethod
    def of_training(cls, losses: list[float], train_seconds: float, data_wait_s: float) -> EpochShare:
        """The training part; validation fills in the rest."""
        return cls(float(np.sum(losses)), len(losses), train_seconds, data_wait_s)


def gather(share: EpochShare) -> list[EpochShare]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, share)
        return out
    return [share]


def evaluate(model: nn.Module, shard, batch_size: int, device, norm: Normalization,
             precision: str | None = None, tta: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Sigmoid probabilities, targets and summed per-image BCE over one validation shard (with `tta`: of the mean
    probability of the 8 views)."""
    probs, targets, loss_sum = [], [], torch.zeros((), device=device)
    batches = shard.iter_torch_batches(batch_size=batch_size, device=device, pin_memory=device.type == "cuda")
    for batch, out in predict_batches(model, batches, device, norm, precision, tta):
        y = batch["target"].float()
        loss_sum += nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1).sum()
        probs.append(torch.sigmoid(out).cpu().numpy())
        targets.append(y.cpu().numpy())
    empty = np.zeros((0, len(TAGS)), np.float32)
    return ((np.concatenate(probs) if probs else empty), (np.concatenate(targets) if targets else empty),
            float(loss_sum))


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
        losses.append(loss.detach())  # kept on the device: reading it each step would wait for the GPU each step
        if progress is not None:  # (the running loss is read only when the line is printed)
            progress.update(len(batch["target"]), lambda: f"loss {torch.stack(losses).mean().item():.4f}")
        t_wait = time.perf_counter()
    return (torch.stack(losses).float().tolist() if losses else []), wait


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
