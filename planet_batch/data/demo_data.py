"""A generated, learnable Planet-like dataset in the competition layout.

Tag sets are drawn from the real joint distribution of `train_v2.csv` (every tag
combination with its count, shipped as `tag_sets.csv`), so weather exclusivity,
`cloudy` standing alone, `primary` being nearly everywhere and rare tags being rare
all hold exactly. Each tag is painted as its own visual pattern so a small CNN can
learn it in a few epochs.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from planet_batch.cluster.storage import write_atomic
from planet_batch.data.labels import Labels

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
TAG_SETS_FILE = "tag_sets.csv"


def tag_set_counts(labels: Labels) -> list[tuple[tuple[str, ...], int]]:
    """Every distinct tag set (sorted tags) with how many images carry it, most common first."""
    counts = Counter(tuple(sorted(t)) for t in labels.tags)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def load_tag_sets() -> list[tuple[tuple[str, ...], int]]:
    with resources.files("planet_batch.data").joinpath(TAG_SETS_FILE).open(newline="") as f:
        return [(tuple(r["tags"].split()), int(r["count"])) for r in csv.DictReader(f)]


def write_tag_sets(counts: Sequence[tuple[tuple[str, ...], int]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tags", "count"])
        w.writerows((" ".join(t), c) for t, c in counts)


def sample_tag_sets(n: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    sets = load_tag_sets()
    p = np.array([c for _, c in sets], dtype=np.float64)
    idx = rng.choice(len(sets), size=n, p=p / p.sum())
    return [sets[i][0] for i in idx]


def _blob(draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: tuple[int, int], fill) -> None:
    cx, cy = rng.integers(0, IMAGE_SIZE, 2)
    rx, ry = rng.integers(r[0], r[1] + 1, 2)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _blobs(count: tuple[int, int], r: tuple[int, int], fill):
    """A painter of `count` [lo, hi) blobs of radius `r`."""
    def paint(d, rng, s):
        for _ in range(rng.integers(*count)):
            _blob(d, rng, r, fill)
    return paint


def _line(draw, rng, width: int, fill) -> None:
    edge = rng.integers(0, IMAGE_SIZE, 4)
    draw.line([(0, edge[0]), (IMAGE_SIZE, edge[1])] if rng.random() < 0.5 else [(edge[2], 0), (edge[3], IMAGE_SIZE)],
              fill=fill, width=width)


def _agriculture(d, rng, s):
    for _ in range(rng.integers(2, 5)):
        x, y = rng.integers(0, s - 40, 2)
        w, h = rng.integers(40, 110, 2)
        d.rectangle([x, y, x + w, y + h], fill=(175, 195, 105))


def _water(d, rng, s):
    pts = [(int(x), int(y)) for x, y in zip(np.linspace(-10, s + 10, 6), rng.integers(0, s, 6))]
    d.line(pts, fill=(35, 60, 130), width=int(rng.integers(10, 18)))


def _road(d, rng, s):
    for _ in range(rng.integers(1, 3)):
        _line(d, rng, 4, (225, 205, 170))


def _habitation(d, rng, s):
    cx, cy = rng.integers(30, s - 30, 2)
    for _ in range(rng.integers(10, 20)):
        x, y = cx + rng.integers(-28, 28), cy + rng.integers(-28, 28)
        d.rectangle([x, y, x + 4, y + 4], fill=(235, 235, 240))


def _selective_logging(d, rng, s):
    for _ in range(rng.integers(6, 12)):
        x, y = rng.integers(0, s - 20, 2)
        d.line([(x, y), (x + 18, y + 6)], fill=(125, 80, 45), width=3)


def _artisinal_mine(d, rng, s):
    for _ in range(rng.integers(3, 6)):
        _blob(d, rng, (5, 10), (235, 165, 50))
        _blob(d, rng, (3, 6), (70, 190, 180))


def _blooming(d, rng, s):
    for _ in range(rng.integers(40, 80)):
        x, y = rng.integers(0, s, 2)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(245, 190, 225))


def _blow_down(d, rng, s):
    for _ in range(rng.integers(3, 6)):
        x, y = rng.integers(0, s - 40, 2)
        d.line([(x, y), (x + 40, y + 40)], fill=(140, 225, 110), width=5)


def _conventional_mine(d, rng, s):
    x, y = rng.integers(0, s - 90, 2)
    w = int(rng.integers(60, 90))
    for k in range(0, w // 2, 8):
        shade = 170 + 2 * k
        d.rectangle([x + k, y + k, x + w - k, y + w - k], fill=(shade, shade, shade - 5))


# What each land tag paints, in painting order (later features cover earlier ones; the order also fixes the
# random draws, so a seed gives the same chips).
PAINTERS = {"bare_ground": _blobs((2, 4), (20, 45), (185, 165, 135)), "agriculture": _agriculture,
            "cultivation": _blobs((4, 8), (6, 12), (160, 110, 70)), "water": _water, "road": _road,
            "habitation": _habitation, "selective_logging": _selective_logging, "artisinal_mine": _artisinal_mine,
            "blooming": _blooming, "slash_burn": _blobs((2, 4), (10, 22), (25, 20, 18)), "blow_down": _blow_down,
            "conventional_mine": _conventional_mine}


def _weather(img: Image.Image, tags: set[str], rng: np.random.Generator) -> Image.Image:
    s = IMAGE_SIZE
    if "haze" in tags:
        return Image.blend(img, Image.new("RGB", (s, s), (205, 205, 215)), 0.45)
    if "partly_cloudy" in tags:
        clouds = Image.new("L", (s, s), 0)
        cd = ImageDraw.Draw(clouds)
        for _ in range(rng.integers(2, 5)):
            _blob(cd, rng, (20, 50), 255)
        clouds = clouds.filter(ImageFilter.GaussianBlur(8))
        return Image.composite(Image.new("RGB", (s, s), (245, 245, 248)), img, clouds)
    if "cloudy" in tags:
        cover = np.clip(225 + rng.normal(0, 10, (s, s, 1)) + rng.normal(0, 3, (s, s, 3)), 0, 255).astype(np.uint8)
        return Image.blend(img, Image.fromarray(cover), 0.92)
    return img


def render(tags: Sequence[str], rng: np.random.Generator) -> Image.Image:
    """Paint one 256x256 chip whose content is determined by its tags."""
    s = IMAGE_SIZE
    tags = set(tags)
    base = (35, 80, 40) if "primary" in tags else (150, 125, 95)
    noise = rng.normal(0, 12, (s, s, 1)) + rng.normal(0, 4, (s, s, 3))
    img = Image.fromarray(np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for tag, paint in PAINTERS.items():
        if tag in tags:
            paint(d, rng, s)
    return _weather(img, tags, rng)


def save_chip(img: Image.Image, path: Path | str) -> None:
    """A chip as Planet ships them: a 4-component (CMYK) JPEG, whose RGB is Pillow's `convert("RGB")`. They decode
    slower than 3-component ones, and GPU JPEG decoders do not take them by default."""
    img.convert("CMYK").save(path, quality=90)


def write_demo_data(
    out: Path | str, n_train: int = 1000, n_test: int = 300, n_additional: int = 150, seed: int = 0
) -> Path:
    """Write a complete competition-layout dataset under `out`; deterministic for a seed."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    train_tags = sample_tag_sets(n_train, rng)
    test_tags = sample_tag_sets(n_test + n_additional, rng)
    for sub in ("train-jpg", "test-jpg", "test-jpg-additional"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    def save(tags, path):
        save_chip(render(tags, rng), path)

    rows = []
    for i, tags in enumerate(train_tags):
        save(tags, out / "train-jpg" / f"train_{i}.jpg")
        rows.append((f"train_{i}", " ".join(tags)))
    _write_csv(out / "train_v2.csv", rows)

    test_names = [f"test_{i}" for i in range(n_test)]
    file_names = sorted(f"file_{i}" for i in range(n_additional))  # Kaggle's string order
    truth = []
    for name, tags in zip(test_names + file_names, test_tags):
        save(tags, out / ("test-jpg" if name.startswith("test_") else "test-jpg-additional") / f"{name}.jpg")
        truth.append((name, " ".join(tags)))
    # Kaggle's sample submission carries one constant tag string; only names and order matter.
    _write_csv(out / "sample_submission_v2.csv", [(n, "primary clear agriculture road water") for n, _ in truth])
    # Ground truth for the test images, so demo scores can be checked (Kaggle keeps its own private).
    _write_csv(out / "test_truth.csv", truth)
    log.info("wrote demo dataset to %s: %d train, %d test, %d additional", out, n_train, n_test, n_additional)
    return out


def _write_csv(path: Path, rows) -> None:
    def write(tmp: Path):
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_name", "tags"])
            w.writerows(rows)

    write_atomic(path, write)
