"""Kaggle submission files: atomic writing and `check-submission`."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from planet_batch.cluster.storage import Location, StorageError, locate
from planet_batch.data.labels import TAG_INDEX
from planet_batch.data.layout import read_sample_submission

HEADER = ["image_name", "tags"]


def write_submission(path: Path | str | Location, rows: Iterable[Iterable[tuple[str, str]]]) -> Location:
    """`image_name,tags` rows, streamed chunk by chunk in the given order, appearing whole or not at all
    (a path or a URI)."""

    def write(p: Path):
        with p.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(HEADER)
            for chunk in rows:
                w.writerows(chunk)

    return locate(path).write_atomic(write)


def check_submission(path: Path | str | Location, sample: Path | str | Location | None = None) -> list[str]:
    """Every reason Kaggle would reject or mis-score `path`; empty when it is fine."""
    problems: list[str] = []
    try:
        path = locate(path)
        rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))
    except (StorageError, UnicodeDecodeError, csv.Error) as e:
        return [f"cannot read {path}: {e}"]
    if not rows or rows[0] != HEADER:
        problems.append(f"header must be {','.join(HEADER)}, found {','.join(rows[0]) if rows else 'an empty file'}")
        return problems
    body = rows[1:]
    bad_width = [i + 2 for i, r in enumerate(body) if len(r) != 2]
    if bad_width:
        problems.append(f"{len(bad_width)} rows without exactly 2 fields, first on line {bad_width[0]}")
        return problems
    names = [r[0] for r in body]
    with_ext = [n for n in names if n.endswith(".jpg")]
    if with_ext:
        problems.append(f"{len(with_ext)} image names carry a .jpg extension (Kaggle wants none), e.g. {with_ext[0]}")
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        problems.append(f"{len(dupes)} duplicated image names, e.g. {dupes[0]}")
    unknown = Counter(t for r in body for t in r[1].split() if t not in TAG_INDEX)
    if unknown:
        problems.append(f"unknown tags: {', '.join(f'{t} ({c}x)' for t, c in unknown.most_common(5))}")
    if sample is not None:
        expected = read_sample_submission(sample)
        if len(names) != len(expected):
            problems.append(f"{len(names)} rows, the sample submission has {len(expected)}")
        missing = set(expected) - set(names)
        extra = set(names) - set(expected)
        if missing:
            problems.append(f"{len(missing)} expected images missing, e.g. {sorted(missing)[:3]}")
        if extra:
            problems.append(f"{len(extra)} images not in the sample submission, e.g. {sorted(extra)[:3]}")
        if not missing and not extra and names != expected:
            first = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
            problems.append(f"rows are not in the sample submission's order: line {first + 2} is {names[first]}, "
                            f"expected {expected[first]}")
    return problems
