"""The shards' rows in the submission's order, with memory that does not grow with the number of images.

An external hash join and a range partition, spilled as Arrow IPC files to a local temp folder by
pyarrow's dataset writer (which streams, keeping a bounded number of rows per open file):

1. the expected names, streamed in submission order, get their rank and go to bucket hash(name) % B;
2. the shards' rows go to the bucket of their name by the same hash;
3. each bucket (about `part_rows` names) is joined in memory: a row missing, present twice or not
   expected fails here, before any output exists; the joined rows go to range part rank // part_rows;
4. the range parts, read in order and each sorted by rank, stream out in the submission's order.

Peak memory is a few buckets' worth whatever the number of images (bench/assemble_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from planet_batch.cluster.storage import Location
from planet_batch.errors import PlanetBatchError, first_line

# Rows joined and sorted at once. bench/assemble_memory.py, peak RSS at 2M images over 20k: 100k rows 1.28x, 50k 1.14x
PART_ROWS = 50_000
OUT_ROWS = 16_384  # rows per table handed to the output writers, which make Python strings of them
READ_ROWS = 65_536
# Rows the dataset writer may hold per open bucket file: its default (up to 1M rows per row group) made
# the peak grow with the number of buckets (+290 MB at 2M images)
SPILL_ROWS = 8_192


class AssemblyError(PlanetBatchError, RuntimeError):
    pass


def _bucket(names: pa.Array, buckets: int) -> pa.Array:
    # pandas' hash is vectorised and stable across processes (Python's hash() is salted per process)
    h = pd.util.hash_array(np.asarray(names.to_pylist(), dtype=object), categorize=False)
    return pa.array((h % np.uint64(buckets)).astype(np.int32))


def _spill(batches: Iterable[pa.RecordBatch], schema: pa.Schema, folder: Path, key: str, name: str = "") -> None:
    """Write the batches into folder/<key value>/ files, streaming; `name` keeps the files of several calls apart."""
    part = pa.schema([schema.field(key)])
    ds.write_dataset(pa.RecordBatchReader.from_batches(schema, iter(batches)), folder, format="ipc",
                     partitioning=ds.partitioning(part), existing_data_behavior="overwrite_or_ignore",
                     basename_template=f"{name}part-{{i}}.arrow",
                     max_rows_per_group=SPILL_ROWS, min_rows_per_group=0)


def _read(folder: Path) -> pa.Table | None:
    return ds.dataset(folder, format="ipc").to_table() if folder.is_dir() else None


@dataclass(frozen=True)
class Assembled:
    """Every expected image's row, on local disk in rank ranges; `tables()` streams them in order."""

    folder: Path
    parts: int
    unreadable: int

    def tables(self) -> Iterator[pa.Table]:
        for k in range(self.parts):
            table = _read(self.folder / str(k))
            if table is not None:
                table = table.sort_by("rank")
                yield from (table.slice(i, OUT_ROWS) for i in range(0, len(table), OUT_ROWS))


def assemble(order: Iterable[Sequence[str]], shards: Sequence[Location], images: int, tmp: Path,
             tags: Sequence[str], part_rows: int = PART_ROWS) -> Assembled:
    """Join the expected names (`order`: chunks of names in submission order) with the shards' rows."""
    buckets = parts = max(1, math.ceil(images / part_rows))  # as many hash buckets as rank ranges, as big
    key = pa.field("bucket", pa.int32())
    order_schema = pa.schema([("image_name", pa.string()), ("rank", pa.int64()), key])
    shard_schema = pa.schema([("image_name", pa.string()), *[(t, pa.float32()) for t in tags], ("ok", pa.bool_()),
                              ("error", pa.string())])
    row_schema = shard_schema.append(key)

    def ranked():
        start = 0
        for chunk in order:
            names = pa.array(list(chunk), pa.string())
            yield pa.record_batch([names, pa.array(np.arange(start, start + len(names))), _bucket(names, buckets)],
                                  schema=order_schema)
            start += len(names)

    def rows():
        for shard in shards:
            try:
                f = pq.ParquetFile(shard.fs.open_input_file(shard.path))
                for b in f.iter_batches(batch_size=READ_ROWS, columns=shard_schema.names):
                    t = pa.Table.from_batches([b]).cast(shard_schema)
                    yield from t.append_column(key, _bucket(t["image_name"].combine_chunks(), buckets)).to_batches()
            except (OSError, ValueError, KeyError) as e:
                raise AssemblyError(f"shard {shard} cannot be read ({first_line(e)}); rerun the same "
                                    "command: unreadable shards are scored again") from None

    _spill(ranked(), order_schema, tmp / "order", "bucket")
    _spill(rows(), row_schema, tmp / "rows", "bucket")

    missing = twice = extra = unreadable = 0
    examples: dict[str, list[str]] = {"missing": [], "twice": [], "extra": []}
    part = pa.field("part", pa.int32())
    for b in range(buckets):
        o, r = _read(tmp / "order" / str(b)), _read(tmp / "rows" / str(b))
        o = o if o is not None else order_schema.empty_table().drop_columns(["bucket"])
        r = r if r is not None else shard_schema.empty_table()
        # Each expected name's row, by one hash lookup (cheaper than a hash join, whose threads' allocations
        # mimalloc kept: +90 MB at 2M images)
        at = pc.index_in(o["image_name"], value_set=r["image_name"])
        found = {"missing": pc.filter(o["image_name"], pc.is_null(at))}
        if len(r) != len(o) - len(found["missing"]):  # some row is there twice or not expected
            counts = pc.value_counts(r["image_name"])
            found["twice"] = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
            found["extra"] = pc.filter(r["image_name"], pc.invert(pc.is_in(r["image_name"], o["image_name"])))
        for what, names in found.items():
            examples[what] = (examples[what] + names.slice(0, 3).to_pylist())[:3]
        missing += len(found["missing"])
        twice += len(found.get("twice", ()))
        extra += len(found.get("extra", ()))
        if missing or twice or extra:
            continue  # keep counting, write nothing
        joined = r.take(at).append_column("rank", o["rank"])
        unreadable += len(joined) - pc.sum(joined["ok"]).as_py() if len(joined) else 0
        joined = joined.append_column(part, pc.cast(pc.divide(joined["rank"], part_rows), pa.int32()))
        _spill(joined.to_batches(), joined.schema, tmp / "ranked", "part", name=f"b{b}-")
    problems = [f"{n} {what} (e.g. {', '.join(examples[key])})" for n, what, key in (
        (missing, "expected images have no row", "missing"), (twice, "images have two rows", "twice"),
        (extra, "rows are for images not expected", "extra")) if n]
    if problems:
        raise AssemblyError("the shards do not match the images: " + "; ".join(problems) + "; no output written")
    return Assembled(tmp / "ranked", parts, unreadable)
