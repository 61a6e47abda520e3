"""Where the files of a Planet dataset live, the test images' submission order, and the validation split."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from planet_batch.cluster.storage import Location, StorageError, existing_dir, locate
from planet_batch.errors import PlanetBatchError

# Each layout names its files relative to the data root.
COMPETITION = {
    "train_csv": "train_v2.csv",
    "train_dir": "train-jpg",
    "test_dir": "test-jpg",
    "additional_dir": "test-jpg-additional",
    "sample_submission": "sample_submission_v2.csv",
}
KAGGLE_DATASET = {  # nikitarom/planets-dataset
    "train_csv": "planet/planet/train_classes.csv",
    "train_dir": "planet/planet/train-jpg",
    "test_dir": "planet/planet/test-jpg",
    "additional_dir": "test-jpg-additional/test-jpg-additional",
    "sample_submission": "planet/planet/sample_submission.csv",
}
LAYOUTS = {"competition": COMPETITION, "kaggle-dataset": KAGGLE_DATASET}


class LayoutError(PlanetBatchError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class Layout:
    root: Location
    kind: str
    train_csv: Location | None
    train_dir: Location | None
    test_dirs: tuple[Location, ...]
    sample_submission: Location | None


def find_layout(root: Path | str | Location, need: Iterable[str] = ()) -> Layout:
    """Find the dataset files under `root` (a path or a URI) in either known layout.

    `need` names what the caller cannot do without ("train", "test"); a missing
    one raises LayoutError listing every place that was looked at.
    """
    try:
        root = existing_dir(root)
    except StorageError as e:
        raise LayoutError(str(e)) from None
    found = {}
    for kind, rel in LAYOUTS.items():
        paths = {k: root / v for k, v in rel.items()}
        exists = {k: p.exists() for k, p in paths.items()}
        found[kind] = (sum(exists.values()), paths, exists)
    kind = max(found, key=lambda k: found[k][0])
    _, paths, exists = found[kind]
    layout = Layout(
        root=root,
        kind=kind,
        train_csv=paths["train_csv"] if exists["train_csv"] else None,
        train_dir=paths["train_dir"] if exists["train_dir"] else None,
        test_dirs=tuple(paths[k] for k in ("test_dir", "additional_dir") if exists[k]),
        sample_submission=paths["sample_submission"] if exists["sample_submission"] else None,
    )
    wanted = {"train": ("train_csv", "train_dir"), "test": ("test_dir",)}
    for what in need:
        missing = [k for k in wanted[what] if not exists[k]]
        if missing:
            looked = ", ".join(f"{root / LAYOUTS[kd][k]} ({kd} layout)" for kd in LAYOUTS for k in wanted[what])
            raise LayoutError(f"no {what} data under {root}; looked for {looked}")
    return layout


def image_files(folder: Location) -> list[Location]:
    """The images of a folder, by the one rule that the checks and every read share: its files named *.jpg (any
    case, as Ray Data's file_extensions match), sorted; other files are skipped. A folder inside is refused: the
    Kaggle layouts have none, and its images would be no one's (Ray Data's folder reads recurse, listings do not)."""
    inside = folder.entries(pafs.FileType.Directory)
    if inside:
        raise LayoutError(f"{inside[0]} is a folder inside the image folder {folder}: images are the .jpg files "
                          "directly in it; move it out")
    return [f for f in folder.entries(pafs.FileType.File) if f.name.lower().endswith(".jpg")]


_TEST_RE = re.compile(r"^test_(\d+)$")


def submission_order(names: Iterable[str]) -> list[str]:
    """Kaggle's row order: every test_N in numeric order, then file_N in string order."""
    names = list(names)
    tests = sorted((n for n in names if _TEST_RE.match(n)), key=lambda n: int(n[5:]))
    others = sorted(n for n in names if not _TEST_RE.match(n))
    return tests + others


def read_sample_submission(path: Path | str | Location) -> list[str]:
    loc = locate(path)
    try:
        text = loc.read_bytes().decode("utf-8-sig")
    except StorageError as e:
        raise LayoutError(str(e)) from None
    except UnicodeDecodeError as e:
        raise LayoutError(f"{loc}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None or header[:1] != ["image_name"]:
            raise LayoutError(f"{loc}: expected a header starting with image_name, got {header}")
        names, seen = [], {}
        for row in reader:
            if not row:
                continue
            if row[0] in seen:  # the submission would hold the row twice
                raise LayoutError(f"{loc}:{reader.line_num}: image {row[0]} is listed twice (first on line "
                                  f"{seen[row[0]]})")
            seen[row[0]] = reader.line_num
            names.append(row[0])
        return names
    except csv.Error as e:
        raise LayoutError(f"{loc}: not valid CSV ({e})") from None


def test_images(layout: Layout) -> tuple[list[str], dict[str, Location]]:
    """The test images in submission order and the location of each.

    The sample submission fixes the order when present; otherwise the files on disk do.
    """
    paths: dict[str, Location] = {}
    for d in layout.test_dirs:
        for p in image_files(d):
            if p.stem in paths:
                raise LayoutError(f"test image {p.stem} is in both {paths[p.stem].parent} and {d}")
            paths[p.stem] = p
    if not paths:
        raise LayoutError(f"no test images (*.jpg) in {', '.join(map(str, layout.test_dirs)) or layout.root}")
    order = read_sample_submission(layout.sample_submission) if layout.sample_submission else submission_order(paths)
    return order, paths


def split_indices(names: Sequence[str], valid_pct: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of `names`, the same on every run, process and machine.

    Sorting first makes it independent of file order; PCG64 is specified bit for bit by numpy.
    """
    if not 0.0 < valid_pct < 1.0:
        raise ValueError(f"valid_pct must be in (0, 1), got {valid_pct}")
    order = np.argsort(np.asarray(names, dtype=object), kind="stable")
    perm = order[np.random.Generator(np.random.PCG64(seed)).permutation(len(names))]
    n_valid = int(round(valid_pct * len(names)))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def fold_indices(names: Sequence[str], k: int, seed: int = 42) -> list[np.ndarray]:
    """Seeded K-fold partition of `names`: K sorted index arrays, every index in exactly one, sizes within
    one of each other; the same on every run, process and machine (as `split_indices`)."""
    order = np.argsort(np.asarray(names, dtype=object), kind="stable")
    perm = order[np.random.Generator(np.random.PCG64(seed)).permutation(len(names))]
    return [np.sort(part) for part in np.array_split(perm, k)]
