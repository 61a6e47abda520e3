"""fastai-style pictures: show_batch, plot_losses and the LR finder's curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from planet_batch.cluster.storage import write_atomic  # noqa: E402


def _save(fig, out: Path | str) -> Path:
    out = Path(out)
    try:
        # The format comes from `out`'s suffix: the temp file's own name ends in .tmp.
        write_atomic(out, lambda p: fig.savefig(p, format=out.suffix.lstrip(".") or "png", dpi=100,
                                                bbox_inches="tight"))
    finally:
        plt.close(fig)
    return out


def show_batch(images: np.ndarray, titles: Sequence[str], out: Path | str, rows: int = 3) -> Path:
    """A rows x rows grid of uint8 HWC images titled with their tags joined by ';'."""
    n = min(len(images), rows * rows)
    fig, axes = plt.subplots(rows, rows, figsize=(3.2 * rows, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images[:n], titles[:n]):
        ax.imshow(img)
        ax.set_title(title, fontsize=8, wrap=True)
    return _save(fig, out)


def plot_losses(batch_losses: Sequence[float], epoch_ends: Sequence[int], valid_losses: Sequence[float],
                out: Path | str) -> Path:
    """Training loss per batch and validation loss at the end of each epoch (fastai's plot_losses)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(batch_losses) + 1), batch_losses, label="train (per batch)", lw=1)
    ax.plot(epoch_ends, valid_losses, "o-", label="valid (per epoch)")
    ax.set_xlabel("batches processed")
    ax.set_ylabel("loss")
    ax.legend()
    return _save(fig, out)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float, out: Path | str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    i = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggestion))))
    ax.plot([lrs[i]], [losses[i]], "ro", label=f"suggested lr {suggestion:.2e}")
    ax.legend()
    return _save(fig, out)
