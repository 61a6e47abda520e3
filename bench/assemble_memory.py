"""Peak memory of assembling the submission from shards: 20,000 against 2,000,000 images.

    python bench/assemble_memory.py                    # 20k and 2M synthetic rows (no model, no Ray)
    python bench/assemble_memory.py --sizes 20000 300000 --part-rows 10000

Each size gets synthetic shards (1,000 rows each, rows shuffled across shards, as the scoring actors
leave them) written by one process, then a fresh process assembles them into the submission's order
and writes submission.csv and the probabilities Parquet, reporting its peak RSS and its growth above the
RSS it had after its imports (`growth_mb`: what the assembly itself holds). `--in-memory` measures the same
for the obvious alternative, every shard read into one table and sorted, for comparison. The last line is JSON.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from planet_batch.cluster.storage import locate
from planet_batch.data.labels import TAGS
from planet_batch.scoring.assemble import PART_ROWS, assemble

SHARD_ROWS = 1000


def names(lo: int, hi: int) -> list[str]:
    return [f"test_{i}" for i in range(lo, hi)]


def make_shards(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    for k, start in enumerate(range(0, n, SHARD_ROWS)):
        idx = perm[start:start + SHARD_ROWS]
        rows = [f"test_{i}" for i in idx]
        pq.write_table(pa.table({
            "path": [f"/data/test-jpg/{r}.jpg" for r in rows], "image_name": rows,
            **{t: rng.random(len(idx), dtype=np.float32) for t in TAGS},
            "ok": np.ones(len(idx), dtype=bool), "error": [""] * len(idx),
        }), folder / f"w_{k:06d}-0.parquet")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def assemble_once(n: int, part_rows: int, tmp: Path) -> dict:
    """Assemble and write the outputs as `planet-batch score` does, streaming; the order is streamed too."""
    from planet_batch.config import ScoreConfig
    from planet_batch.scoring.score import write_outputs

    baseline = rss_mb()
    t0 = time.perf_counter()
    order = (names(lo, min(lo + 65_536, n)) for lo in range(0, n, 65_536))
    shards = [locate(p) for p in sorted((tmp / "shards").glob("*.parquet"))]
    rows = assemble(order, shards, n, tmp / "spill", TAGS, part_rows)
    cfg = ScoreConfig(model="unused", images="unused", probs_out=str(tmp / "probs.parquet"))
    write_outputs(rows, locate(tmp / "submission.csv"), 0.2, cfg, TAGS)
    lines = sum(1 for _ in (tmp / "submission.csv").open())
    assert lines == n + 1, lines
    return {"images": n, "part_rows": part_rows, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(rss_mb(), 1), "growth_mb": round(rss_mb() - baseline, 1),
            "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20, 1)}


def in_memory_once(n: int, tmp: Path) -> dict:
    """The alternative the streaming assembly replaces: every shard in one Arrow table, sorted by name."""
    baseline = rss_mb()
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp / "shards").glob("*.parquet")))
    table = table.sort_by("image_name")
    assert table.num_rows == n
    return {"images": n, "in_memory": True, "peak_rss_mb": round(rss_mb(), 1),
            "growth_mb": round(rss_mb() - baseline, 1),
            "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20, 1)}


def measure(n: int, part_rows: int, tmp: Path) -> dict:
    subprocess.run([sys.executable, __file__, "--make", str(n), "--tmp", str(tmp)], check=True)
    out = subprocess.run([sys.executable, __file__, "--one", str(n), "--part-rows", str(part_rows), "--tmp",
                          str(tmp)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[20_000, 2_000_000])
    p.add_argument("--part-rows", type=int, default=PART_ROWS)
    p.add_argument("--make", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        make_shards(args.tmp / "shards", args.make)
    elif args.one and args.in_memory:
        print(json.dumps(in_memory_once(args.one, args.tmp)))
    elif args.one:
        print(json.dumps(assemble_once(args.one, args.part_rows, args.tmp)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            small, large = (measure(n, args.part_rows, Path(tmp) / str(n)) for n in args.sizes)
        print(json.dumps({"bench": "assemble_memory", "small": small, "large": large,
                          "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
