"""Assembling shards into the submission's order: exact, loud on bad shards, memory that does not grow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from planet_batch.cluster.storage import locate
from planet_batch.data.labels import TAGS
from planet_batch.scoring.assemble import AssemblyError, assemble

ROOT = Path(__file__).resolve().parents[2]


def write_shards(folder: Path, names: list[str], rows_per_shard: int, seed: int = 0) -> np.ndarray:
    """Shards as the scoring actors write them, rows in a shuffled order; returns the probabilities by name order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    probs = rng.random((len(names), len(TAGS)), dtype=np.float32)
    perm = rng.permutation(len(names))
    for k, start in enumerate(range(0, len(names), rows_per_shard)):
        idx = perm[start:start + rows_per_shard]
        pq.write_table(pa.table({
            "path": [f"/data/{names[i]}.jpg" for i in idx], "image_name": [names[i] for i in idx],
            **{t: probs[idx, j] for j, t in enumerate(TAGS)},
            "ok": [names[i] != "test_3" for i in idx], "error": ["" if names[i] != "test_3" else "truncated"
                                                                  for i in idx],
        }), folder / f"w_{k:06d}-0.parquet")
    return probs


def shards(folder: Path):
    return [locate(p) for p in sorted(folder.glob("*.parquet"))]


def test_rows_come_out_in_submission_order_with_their_probabilities(tmp_path):
    names = [f"test_{i}" for i in range(500)] + [f"file_{i}" for i in range(300)]
    probs = write_shards(tmp_path / "shards", names, 37)
    order = names[::-1]  # any order the sample submission has
    rows = assemble([order[:100], order[100:]], shards(tmp_path / "shards"), len(order), tmp_path / "tmp", TAGS,
                    part_rows=64)
    tables = list(rows.tables())
    assert len(tables) == rows.parts == 13
    got = pa.concat_tables(tables)
    assert got["image_name"].to_pylist() == order
    np.testing.assert_array_equal(np.column_stack([got[t].to_numpy() for t in TAGS]), probs[::-1])
    assert rows.unreadable == 1 and got["rank"].to_pylist() == list(range(len(order)))


def test_a_missing_a_doubled_or_an_unexpected_row_fails_and_says_which(tmp_path):
    names = [f"test_{i}" for i in range(200)]
    write_shards(tmp_path / "shards", names, 50)
    with pytest.raises(AssemblyError, match=r"1 expected images have no row \(e.g. test_200\)"):
        assemble([names + ["test_200"]], shards(tmp_path / "shards"), 201, tmp_path / "a", TAGS, part_rows=64)
    with pytest.raises(AssemblyError, match=r"1 rows are for images not expected \(e.g. test_0\)"):
        assemble([names[1:]], shards(tmp_path / "shards"), 199, tmp_path / "b", TAGS, part_rows=64)
    pq.write_table(pq.read_table(tmp_path / "shards" / "w_000000-0.parquet").slice(0, 1),
                   tmp_path / "shards" / "w_extra-0.parquet")
    with pytest.raises(AssemblyError, match=r"1 images have two rows"):
        assemble([names], shards(tmp_path / "shards"), 200, tmp_path / "c", TAGS, part_rows=64)


def test_a_shard_that_is_not_parquet_is_named(tmp_path):
    names = [f"test_{i}" for i in range(100)]
    write_shards(tmp_path / "shards", names, 50)
    bad = tmp_path / "shards" / "w_000001-0.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(AssemblyError, match="w_000001-0.parquet cannot be read"):
        assemble([names], shards(tmp_path / "shards"), 100, tmp_path / "a", TAGS)


def assembly_memory(images: int, tmp: Path, part_rows: int, *extra: str) -> dict:
    """Assemble `images` synthetic rows in a fresh process (no model, no Ray): its peak RSS, its growth above the
    RSS after its imports, and the peak of pyarrow's memory pool (bench/assemble_memory.py)."""
    bench = [sys.executable, "bench/assemble_memory.py", "--tmp", str(tmp)]
    if not (tmp / "shards").exists():
        subprocess.run([*bench, "--make", str(images)], cwd=ROOT, check=True, timeout=600)
    out = subprocess.run([*bench, "--one", str(images), "--part-rows", str(part_rows), *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


ARROW_PEAK_MB = 16  # measured: 4.0 MB at 20k rows, 4.4 MB at 300k; every shard in one table: 73 MB at 300k


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # 15x the rows, the same few buckets of 10k rows in memory (bench/assemble_memory.py: 2M rows)
    small = assembly_memory(20_000, tmp_path / "small", 10_000)
    large = assembly_memory(300_000, tmp_path / "large", 10_000)
    assert large["arrow_peak_mb"] <= ARROW_PEAK_MB and large["arrow_peak_mb"] <= small["arrow_peak_mb"] + 4, (
        small, large)
    assert large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"], (small, large)
    # The bound means something: the same shards joined in memory go far past it.
    joined = assembly_memory(300_000, tmp_path / "large", 10_000, "--in-memory")
    assert joined["arrow_peak_mb"] > 2 * ARROW_PEAK_MB, joined
