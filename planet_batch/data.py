"""Planet images into Ray Datasets: training/validation with labels, and test images for scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planet_batch.labels import Labels, read_labels
from planet_batch.layout import find_layout, split_indices
from planet_batch.transforms import augment_batch, decode_image


@dataclass(frozen=True)
class Split:
    """Labelled images of one split: paths and multi-hot targets in the same order."""

    names: tuple[str, ...]
    paths: tuple[str, ...]
    targets: np.ndarray  # (n, n_tags) float32

    def __len__(self) -> int:
        return len(self.names)


def load_training_data(data_root: Path | str) -> tuple[Labels, Path]:
    """The validated labels and image folder of a dataset (fails before any Ray or torch work)."""
    layout = find_layout(data_root, need=("train",))
    return read_labels(layout.train_csv, image_dir=layout.train_dir), layout.train_dir


def train_valid_split(data_root: Path | str, valid_pct: float = 0.2, seed: int = 42) -> tuple[Split, Split]:
    labels, image_dir = load_training_data(data_root)
    targets = labels.multi_hot()
    paths = [str((image_dir / f"{n}.jpg").resolve()) for n in labels.names]

    def take(idx):
        return Split(tuple(labels.names[i] for i in idx), tuple(paths[i] for i in idx), targets[idx])

    train_idx, valid_idx = split_indices(labels.names, valid_pct, seed)
    return take(train_idx), take(valid_idx)


def augmented_sample(split: Split, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` random training images decoded and augmented exactly as training sees them."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(split), size=min(n, len(split)), replace=False)
    images = np.stack([decode_image(Path(split.paths[i]).read_bytes(), size, split.names[i]) for i in idx])
    return augment_batch(images, rng), [split.names[i] for i in idx], split.targets[idx]
