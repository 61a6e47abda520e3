"""fastai's `lr_find`: an exponential learning-rate sweep on the first stage's setup, weights restored after."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planet_batch.config import TrainConfig
from planet_batch.data.datasets import labelled_dataset, train_valid_split
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import to_model_input
from planet_batch.errors import PlanetBatchError
from planet_batch.model import build_model, normalization, set_frozen, training_setup

log = logging.getLogger(__name__)


class LRFindError(PlanetBatchError, ValueError):
    pass


@dataclass(frozen=True)
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed, debiased
    suggestion: float  # steepest descent of the smoothed loss
    stopped_early: bool


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR where the smoothed loss falls fastest (fastai v1's suggestion).

    The last few points are left out: they are where the loss turns up and the gradient is noise.
    """
    n = max(2, len(losses) - 3)
    grads = np.gradient(np.asarray(losses[:n]), np.log10(np.asarray(lrs[:n])))
    return float(lrs[int(np.argmin(grads))])


def lr_sweep(model: nn.Module, batches, start_lr=1e-7, end_lr=10.0, num_it=100, stop_div=4.0, beta=0.98,
             weight_decay=1e-2) -> LRFindResult:
    """Train on `batches` (an iterable of (x, y)) while the LR grows exponentially; restore weights after.

    Every layer group gets the same LR, as in fastai's sweep; frozen groups simply do not move.
    """
    saved = copy.deepcopy(model.state_dict())
    setup = training_setup(model, start_lr, weight_decay)
    optimizer, loss_fn = setup.optimizer, setup.loss_fn
    lrs, losses = [], []
    avg, best, stopped = 0.0, float("inf"), False
    model.train()
    try:
        for i, (x, y) in enumerate(batches):
            if i >= num_it:
                break
            lr = start_lr * (end_lr / start_lr) ** (i / max(1, num_it - 1))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = beta * avg + (1 - beta) * loss.item()
            smoothed = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not np.isfinite(smoothed) or smoothed > stop_div * best:
                stopped = True
                break
    finally:
        model.load_state_dict(saved)
    if len(lrs) < 3:
        raise LRFindError(f"LR finder ran only {len(lrs)} batches; it needs more training images or a smaller batch")
    return LRFindResult(lrs, losses, suggest_lr(np.array(lrs), np.array(losses)), stopped)


def run_lr_find(cfg: TrainConfig, data_root: Path | str, out: Path | str, num_it: int = 100) -> LRFindResult:
    """`learn.lr_find(); learn.recorder.plot()` for the config's first stage, in this process."""
    from planet_batch.cluster.runtime import ensure_ray
    from planet_batch.cluster.storage import locate, read_placement
    from planet_batch.training.plots import plot_lr_find

    stage = cfg.stages[0]
    data = locate(data_root)
    train, _ = train_valid_split(data, cfg.valid_pct, cfg.seed)
    model = build_model(cfg.arch, len(TAGS), weights=cfg.weights, dropout=cfg.dropout)  # bad weights: before Ray
    ensure_ray()
    set_frozen(model, stage.frozen)
    torch.set_num_threads(cfg.torch_threads or torch.get_num_threads())
    ds = labelled_dataset(train, stage.size, augment=True, label_selector=read_placement(data, cfg.data_shared))
    norm = normalization(cfg.arch)

    def batches():
        while True:  # as many epochs as num_it needs
            for b in ds.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True):
                yield to_model_input(b["image"], "cpu", norm), b["target"].float()

    result = lr_sweep(model, batches(), num_it=num_it, weight_decay=cfg.weight_decay)
    plot_lr_find(result.lrs, result.losses, result.suggestion, out)
    return result
