"""The Planet tag vocabulary, label files, and multi-hot encoding."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planet_batch.cluster.storage import Location, locate
from planet_batch.errors import PlanetBatchError

# fastai's MultiCategoryList sorts its classes, so this is the order of the lesson-3 notebook's outputs.
TAGS: tuple[str, ...] = (
    "agriculture",
    "artisinal_mine",
    "bare_ground",
    "blooming",
    "blow_down",
    "clear",
    "cloudy",
    "conventional_mine",
    "cultivation",
    "habitation",
    "haze",
    "partly_cloudy",
    "primary",
    "road",
    "selective_logging",
    "slash_burn",
    "water",
)
WEATHER_TAGS: tuple[str, ...] = ("clear", "cloudy", "haze", "partly_cloudy")
TAG_INDEX = {t: i for i, t in enumerate(TAGS)}


class LabelFileError(PlanetBatchError, ValueError):
    """A label file that cannot be used; the message names the file, the line and the problem."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass(frozen=True)
class Labels:
    """Image names (no extension) and their tag lists, in file order."""

    names: tuple[str, ...]
    tags: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.names)

    def multi_hot(self) -> np.ndarray:
        return encode(self.tags)


def read_labels(path: Path | str | Location, image_dir: Path | str | Location | None = None) -> Labels:
    """Parse `image_name,tags` (train_v2.csv or train_classes.csv) and validate it.

    With `image_dir`, every listed image must exist there as NAME.jpg. Both may be paths or URIs.
    """
    path = locate(path)
    rows = _csv_rows(path)
    header_line, header = rows[0]
    missing = [c for c in ("image_name", "tags") if c not in header]
    if missing:
        raise LabelFileError(path, header_line, f"missing column(s) {missing}; header is {header}")
    i_name, i_tags = header.index("image_name"), header.index("tags")

    names: list[str] = []
    tags: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise LabelFileError(path, line, f"expected {len(header)} fields, found {len(row)}")
        name, tag_list = row[i_name], row[i_tags].split()
        _check_row(path, line, name, tag_list, seen)
        seen[name] = line
        names.append(name)
        tags.append(tuple(tag_list))
    if not names:
        raise LabelFileError(path, None, "no rows after the header")

    if image_dir is not None:
        check_images_exist(path, names, locate(image_dir))
    return Labels(tuple(names), tuple(tags))


def _csv_rows(path: Location) -> list[tuple[int, list[str]]]:
    """The file's non-blank CSV rows with their line numbers, cells stripped; the header first."""
    try:
        # utf-8-sig: spreadsheet tools prepend a BOM that would otherwise rename the first column.
        text = path.read_bytes().decode("utf-8-sig")
        rows = list(enumerate(csv.reader(io.StringIO(text, newline=""), skipinitialspace=True), start=1))
    except UnicodeDecodeError as e:
        raise LabelFileError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        raise LabelFileError(path, None, f"not valid CSV ({e})") from e
    rows = [(n, [c.strip() for c in r]) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise LabelFileError(path, None, "empty file, expected a header `image_name,tags`")
    return rows


def _check_row(path: Location, line: int, name: str, tag_list: list[str], seen: dict[str, int]) -> None:
    if not name:
        raise LabelFileError(path, line, "empty image_name")
    if name in seen:
        raise LabelFileError(path, line, f"duplicate image name {name!r} (first on line {seen[name]})")
    if not tag_list:
        raise LabelFileError(path, line, f"empty tag set for {name!r}")
    unknown = [t for t in tag_list if t not in TAG_INDEX]
    if unknown:
        raise LabelFileError(path, line, f"unknown tag(s) {unknown} for {name!r}; known tags: {' '.join(TAGS)}")


def check_images_exist(label_path: Location, names: Sequence[str], image_dir: Location) -> None:
    on_disk = {p.stem for p in image_dir.files(".jpg")}  # (read as NAME.jpg: datasets.labelled_split)
    missing = [n for n in names if n not in on_disk]
    if missing:
        raise LabelFileError(
            label_path, None,
            f"{len(missing)} of {len(names)} listed images are missing from {image_dir}, "
            f"first: {', '.join(m + '.jpg' for m in missing[:5])}",
        )


def encode(tag_lists: Iterable[Sequence[str]]) -> np.ndarray:
    """Multi-hot float32 matrix, one row per image, columns in TAGS order."""
    tag_lists = list(tag_lists)
    out = np.zeros((len(tag_lists), len(TAGS)), dtype=np.float32)
    for i, tl in enumerate(tag_lists):
        for t in tl:
            out[i, TAG_INDEX[t]] = 1.0
    return out


def decode(probs: np.ndarray, thresholds: float | Sequence[float] | np.ndarray = 0.2) -> list[str]:
    """Space-joined tags (TAGS order) whose probability exceeds the threshold, one string per row.

    `thresholds` is one number for every class or one per class.
    """
    probs = np.atleast_2d(np.asarray(probs))
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (probs.shape[1],))
    if probs.shape[1] != len(TAGS):
        raise ValueError(f"expected {len(TAGS)} probabilities per row, got {probs.shape[1]}")
    hits = probs > thr
    return [" ".join(TAGS[j] for j in np.flatnonzero(row)) for row in hits]
