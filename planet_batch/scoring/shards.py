"""The scoring work folder: Parquet shards that Ray Data writes, and what a rerun may take from them.

    WORK/run.json     what the rows were computed with: exports' weight fingerprints, size, TTA, precision, tags, inputs
    WORK/shards/      one Parquet file per write task: path, image_name, 17 probabilities, ok, error
    WORK/commits/     Ray Data's checkpoint files: the ids (image paths) of each shard, `.pending` until written
    WORK/.created-by-planet-batch   only in a folder scoring made, which it then removes after success

Scoring deletes only these: a folder without run.json is never adopted unless it is empty, and --overwrite
empties only a work folder, of these entries alone.

Ray Data's job-level checkpointing (`CheckpointConfig`) writes the shards with a two-phase commit:
the ids go to `commits/X.pending.parquet`, then the shard `shards/X-0.parquet`, then the pending file is
renamed. A committed id file therefore means a whole shard. Its resume side is not used, for two measured
reasons (docs/scoring.md, "Resuming"): its `CheckpointFilter` is a pool of actors of one CPU and 1 GiB each
placed between the read and the decode; with the scoring actors that left no CPU for the read and decode
tasks on a 2-core machine and the rerun hung (Ray Data: "2.5/2 CPU", no row in 60 s). It also reads every
already-scored image again only to drop it. Instead the driver reads the committed ids here, and the
pipeline reads only the images that have none; Ray's recovery of half-done commits is done here too, in
the driver, which always reaches the work folder (Ray runs it as a task that may land on another node).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager

from planet_batch.cluster.storage import Location, StorageError, locate
from planet_batch.errors import PlanetBatchError, first_line
from planet_batch.scoring import ID_COLUMN

log = logging.getLogger(__name__)

CREATED = ".created-by-planet-batch"  # in a work folder that scoring made (not one it was given)
PENDING = ".pending.parquet"  # ray.data.checkpoint.checkpoint_writer.PENDING_CHECKPOINT_SUFFIX + ".parquet"


class WorkFolderError(PlanetBatchError, RuntimeError):
    pass


def _by_write_task(shards: list[Location]) -> dict[str, list[Location]]:
    """The shards by the write task that wrote them: Ray names a commit `X.parquet` and its shards
    `X-0.parquet`, `X-1.parquet`, ... (or `X.parquet`), so one lookup per commit finds them."""
    tasks: dict[str, list[Location]] = {}
    for s in shards:
        stem = s.name.removesuffix(".parquet")
        base, sep, index = stem.rpartition("-")
        tasks.setdefault(base if sep and index.isdigit() else stem, []).append(s)
    return tasks


@dataclass
class WorkFolder:
    root: Location
    _counted: dict[str, int] = field(default_factory=dict)  # commit file -> rows, for progress

    @property
    def shards(self) -> Location:
        return self.root / "shards"

    @property
    def commits(self) -> Location:
        return self.root / "commits"

    @property
    def manifest(self) -> Location:
        return self.root / "run.json"

    @property
    def marker(self) -> Location:
        return self.root / CREATED

    @classmethod
    def open(cls, where: str | Location, run: dict, overwrite: bool) -> WorkFolder:
        """The work folder for a run described by `run`: new, resumed, or (with `overwrite`) emptied.

        Scoring removes only what it made: a work folder is one with a run.json, and an existing folder without
        one is refused (with or without `overwrite`) unless it is empty. Rows computed with other weights, size,
        TTA or inputs are never mixed in: a folder whose run.json differs is refused with one line.
        """
        work = cls(locate(where))
        work.root.parent.check_writable_folder()
        kind = work.root.info().type
        if kind == pafs.FileType.File:
            raise WorkFolderError(f"work folder {work.root} is a file; give another --work-dir")
        if kind == pafs.FileType.NotFound:
            work.create()
        elif work.manifest_run() is None:
            entries = work.root.entries()
            if entries:
                raise WorkFolderError(
                    f"work folder {work.root} exists and is not one (no scoring run.json; it holds {entries[0].name}"
                    f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}): give another --work-dir, "
                    "nothing there is touched")
        elif overwrite:
            work.empty()
        else:
            work.check_same_run(run)
        try:
            work.manifest.write_atomic(lambda p: p.write_text(json.dumps(run, indent=2, sort_keys=True)))
            if work.root.local:
                Path(work.shards.path).mkdir(exist_ok=True)
                Path(work.commits.path).mkdir(exist_ok=True)
        except (OSError, StorageError) as e:
            raise WorkFolderError(f"work folder {work.root}: cannot write it: {e}") from None
        return work

    def create(self) -> None:
        """A new folder, marked as made by this run (`remove` takes the folder itself only then)."""
        try:
            if self.root.local:
                Path(self.root.path).mkdir()
            self.marker.write_atomic(lambda p: p.write_text("made by planet-batch score; removed after success\n"))
        except (OSError, StorageError) as e:
            raise WorkFolderError(f"work folder {self.root}: cannot create it: {first_line(e)}") from None

    def manifest_run(self) -> dict | None:
        """What run.json says the rows were computed with; None when there is none, or it is not scoring's (a
        training run folder has a run.json too)."""
        if not self.manifest.is_file():
            return None
        try:
            run = json.loads(self.manifest.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return run if isinstance(run, dict) and "models" in run else None

    def check_same_run(self, run: dict) -> None:
        before = self.manifest_run()
        if before != run:
            what = {"models": "--model", "size": "input size", "tta": "--tta", "precision": "--precision"}
            differ = [what.get(k, k) for k in sorted(set(run) | set(before or {}))
                      if (before or {}).get(k) != run.get(k)]
            raise WorkFolderError(
                f"work folder {self.root}: its rows were scored with another {' and '.join(differ)}; rerun "
                "with the same ones to resume, or pass --overwrite to start over")

    def checkpoint_config(self):
        """Ray Data's two-phase-commit writing into this folder; the filter is replaced (module docstring)."""
        return CheckpointConfig(
            id_column=ID_COLUMN, checkpoint_path=str(self.commits), override_filesystem=self.commits.fs,
            delete_checkpoint_on_success=False,  # the shards outlive the write: assembly reads them
            checkpoint_manager_cls=ListedBeforeRead,
        )

    def recover(self) -> set[str]:
        """Clean what an interruption left, then the ids (image paths) of every whole shard.

        A pending commit means its shard may be half-written: the shard goes, its images are scored again
        (what Ray's own recovery does). A committed shard that is missing or does not open as Parquet
        (truncated, overwritten) goes with its commit, with one warning line: rescored, never dropped.
        """
        try:
            return self._recover()
        except OSError as e:  # (a StorageError is one) listing or deleting failed
            raise WorkFolderError(f"work folder {self.root}: cannot clean up after the last run: "
                                  f"{first_line(e)}") from None

    def _recover(self) -> set[str]:
        shards = _by_write_task(self.shards.files(".parquet"))
        done: set[str] = set()
        for commit in self.commits.files(".parquet"):
            if commit.name.endswith(PENDING):
                for s in shards.get(commit.name.removesuffix(PENDING), []):
                    s.fs.delete_file(s.path)
                commit.fs.delete_file(commit.path)
                continue
            files = shards.get(commit.name.removesuffix(".parquet"), [])
            try:
                rows = sum(pq.ParquetFile(s.fs.open_input_file(s.path)).metadata.num_rows for s in files)
                ids = pq.read_table(commit.fs.open_input_file(commit.path), columns=[ID_COLUMN])[ID_COLUMN]
                if not files or rows != len(ids):
                    raise ValueError(f"{len(files)} shard files with {rows} rows for {len(ids)} ids")
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                log.warning("work folder: shard %s is unreadable (%s); its images will be scored again",
                            files[0] if files else commit.name, first_line(e))
                for s in [*files, commit]:
                    s.fs.delete_file(s.path)
                continue
            done.update(ids.to_pylist())
        return done

    def committed_rows(self) -> int:
        """Rows in whole shards now (for progress): one footer read per new commit file."""
        for commit in self.commits.files(".parquet"):
            if commit.path not in self._counted and not commit.name.endswith(PENDING):
                try:
                    f = commit.fs.open_input_file(commit.path)
                    self._counted[commit.path] = pq.ParquetFile(f).metadata.num_rows
                except (OSError, ValueError):
                    pass  # being renamed right now: counted next time
        return sum(self._counted.values())

    def shard_files(self) -> list[Location]:
        return self.shards.files(".parquet")

    def empty(self) -> None:
        """Delete what scoring writes here (shards, commits, run.json) and nothing else."""
        try:
            for folder in (self.shards, self.commits):
                if folder.is_dir():
                    folder.fs.delete_dir(folder.path)
            if self.manifest.is_file():
                self.manifest.fs.delete_file(self.manifest.path)
        except OSError as e:  # (a StorageError is one)
            raise WorkFolderError(f"work folder {self.root}: cannot empty it: {first_line(e)}") from None

    def remove(self) -> None:
        """After success: what scoring wrote, then the folder itself if this run made it and nothing else is
        in it now (an existing empty folder it was given stays, and so does anything put there meanwhile)."""
        self.empty()
        entries = self.root.entries()
        if [e.name for e in entries] == [CREATED]:
            self.marker.fs.delete_file(self.marker.path)
            with contextlib.suppress(FileNotFoundError):  # (an object store has no folder left to delete)
                self.root.fs.delete_dir(self.root.path)


class ListedBeforeRead(IdColumnCheckpointManager):
    """Ray's checkpoint manager with nothing to filter: `WorkFolder.recover` already cleaned pending
    commits and the pipeline reads only unscored images, so no `CheckpointFilter` operator is planned.

    Ray 2.60's CheckpointConfig has no switch for writing without its resume filter; one (or a public name for
    the pending suffix) would let this subclass and PENDING go."""

    def load_checkpoint(self, data_file_dir=None, data_file_filesystem=None):
        return None, 0
