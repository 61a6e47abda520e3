"""Labelled Planet chips into Ray Datasets for training and validation (the seeded split, decode, augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from planet_batch.cluster.storage import Location, StorageError
from planet_batch.data.labels import Labels, read_labels
from planet_batch.data.layout import find_layout, split_indices
from planet_batch.data.transforms import DecodeError, augment_batch, decode_batch, decode_image, image_name


@dataclass(frozen=True)
class Split:
    """Labelled images of one split: paths (in `fs`) and multi-hot targets in the same order."""

    names: tuple[str, ...]
    paths: tuple[str, ...]
    targets: np.ndarray  # (n, n_tags) float32
    fs: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem)

    def __len__(self) -> int:
        return len(self.names)

    def without(self, names: set[str]) -> Split:
        """This split less the images named in `names`."""
        return self.part(np.asarray([i for i, n in enumerate(self.names) if n not in names], dtype=np.int64))

    def part(self, index) -> Split:
        """The images at `index` (a slice or an index array), same filesystem."""
        names, paths = np.asarray(self.names, dtype=object)[index], np.asarray(self.paths, dtype=object)[index]
        return Split(tuple(names), tuple(paths), self.targets[index], self.fs)


def load_training_data(data_root: Path | str | Location) -> tuple[Labels, Location]:
    """The validated labels and image folder of a dataset (fails before any Ray or torch work)."""
    layout = find_layout(data_root, need=("train",))
    return read_labels(layout.train_csv, image_dir=layout.train_dir), layout.train_dir


def labelled_split(data_root: Path | str | Location) -> Split:
    """Every labelled image of a dataset, in the labels file's order."""
    labels, image_dir = load_training_data(data_root)
    return Split(labels.names, tuple((image_dir / f"{n}.jpg").path for n in labels.names), labels.multi_hot(),
                 image_dir.fs)


def train_valid_split(data_root: Path | str | Location, valid_pct: float = 0.2,
                      seed: int = 42) -> tuple[Split, Split]:
    every = labelled_split(data_root)
    train_idx, valid_idx = split_indices(every.names, valid_pct, seed)
    return every.part(train_idx), every.part(valid_idx)


def augmented_sample(split: Split, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` random training images through the training pipeline's own batch function."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(split), size=min(n, len(split)), replace=False)
    batch = load_labelled_batch({"path": [split.paths[i] for i in idx], "target": split.targets[idx]}, size,
                                augment=True, fs=split.fs, rng=rng)
    return batch["image"], [split.names[i] for i in idx], batch["target"]


def load_labelled_batch(batch: dict, size: int, augment: bool, fs: pafs.FileSystem,
                        rng: np.random.Generator | None = None) -> dict:
    """{path, target} -> {image uint8 NHWC, target}; reading, decoding and augmentation run in Ray Data's tasks.

    Without `rng` every call draws fresh augmentations, as each training epoch should.
    """
    paths = list(batch["path"])
    images = decode_batch({"bytes": [Location(fs, p).read_bytes() for p in paths], "path": paths}, size)["image"]
    if augment:
        images = augment_batch(images, rng if rng is not None else np.random.default_rng())
    return {"image": images, "target": np.asarray(batch["target"], dtype=np.float32)}


def labelled_dataset(split: Split, size: int, augment: bool, rows_per_block: int = 64, seed: int = 0,
                     label_selector: dict[str, str] | None = None):
    """A Ray Dataset of decoded (and, for training, shuffled and augmented) images with targets.

    `label_selector` (storage.read_placement) pins the tasks that open the files to the node
    that has them; the decoded blocks then reach workers anywhere through the object store.

    Training order: rows are permuted once into blocks, the block order is drawn anew every
    epoch, and the trainer's local shuffle buffer mixes rows across blocks. Unlike
    `random_shuffle`, this has no all-to-all barrier at the start of every epoch, which
    left the model waiting for its first batch. Every epoch re-executes the pipeline, so
    augmentations are new each epoch too.
    """
    import ray

    order = np.random.default_rng(seed).permutation(len(split)) if augment else np.arange(len(split))
    items = [{"path": split.paths[i], "target": split.targets[i]} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // rows_per_block)))
    if augment:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        load_labelled_batch,
        fn_kwargs={"size": size, "augment": augment, "fs": split.fs},
        batch_size=rows_per_block,
        batch_format="numpy",
        label_selector=label_selector,
    )


def check_batch(batch: dict, size: int, fs: pafs.FileSystem) -> dict:
    """{path} -> {name, error} of the images among them that cannot be read or decoded (none when all can)."""
    bad: list[tuple[str, str]] = []
    for path in batch["path"]:
        try:
            decode_image(Location(fs, path).read_bytes(), size, image_name(path))
        except DecodeError as e:
            bad.append((e.name, e.reason))
        except StorageError as e:
            bad.append((image_name(path), str(e)))
    return {"name": np.asarray([n for n, _ in bad], dtype=object),
            "error": np.asarray([e for _, e in bad], dtype=object)}


def unreadable(split: Split, size: int, label_selector: dict[str, str] | None = None,
               rows_per_block: int = 64) -> dict[str, str]:
    """name -> why, for the images of `split` that cannot be read or decoded at `size`: one decode pass in Ray Data
    tasks (where `label_selector` puts the reads), before any training."""
    import ray

    ds = ray.data.from_items([{"path": p} for p in split.paths],
                             override_num_blocks=max(1, -(-len(split) // rows_per_block)))
    rows = ds.map_batches(check_batch, fn_kwargs={"size": size, "fs": split.fs}, batch_size=rows_per_block,
                          batch_format="numpy", label_selector=label_selector).take_all()
    return {r["name"]: r["error"] for r in rows}
