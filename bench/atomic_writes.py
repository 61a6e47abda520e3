"""What fsync costs write_atomic, on the files a demo run writes through it.

    python -m bench.atomic_writes [--root demo_out] [--repeats 5]

Every file of the run folder and the scoring outputs that write_atomic writes (model.pt, stages/*.pt, metrics.csv,
run.json, submission.csv, probs.parquet, ...) is written again into a scratch folder on the same disk, with the
fsyncs and without, alternating, `--repeats` times each; it prints each file's median milliseconds both ways and the
run's total. The last line is JSON.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from planet_batch.cluster import storage

WRITTEN = ["run/run.json", "run/config.yaml", "run/metrics.csv", "run/stages/*.pt", "run/export/model.pt",
           "run/export/model.json", "submission.csv", "probs.parquet", "score_summary.json"]


def timed(target: Path, data: bytes) -> float:
    t0 = time.perf_counter()
    storage.write_atomic(target, lambda p: p.write_bytes(data))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="demo_out")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    files = [f for pattern in WRITTEN for f in sorted(Path(args.root).glob(pattern))]
    if not files:
        raise SystemExit(f"no demo outputs under {args.root}: run make demo first")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as d:
        for f in files:
            data, target = f.read_bytes(), Path(d) / f.name
            synced, plain = [], []
            for _ in range(args.repeats):
                synced.append(timed(target, data))
                with mock.patch.object(storage, "fsync", lambda path: None):
                    plain.append(timed(target, data))
            rows.append({"file": str(f.relative_to(args.root)), "bytes": len(data),
                         "fsync_ms": round(statistics.median(synced) * 1e3, 2),
                         "no_fsync_ms": round(statistics.median(plain) * 1e3, 2)})
            print(f"{rows[-1]['file']:32} {len(data):>12,} B  {rows[-1]['fsync_ms']:8.2f} ms with fsync, "
                  f"{rows[-1]['no_fsync_ms']:8.2f} ms without")
    total = {k: round(sum(r[k] for r in rows), 1) for k in ("fsync_ms", "no_fsync_ms")}
    print(f"{len(rows)} writes: {total['fsync_ms']} ms with fsync, {total['no_fsync_ms']} ms without")
    print(json.dumps({"writes": len(rows), **total, "files": rows}))


if __name__ == "__main__":
    main()
