"""Where data, models and outputs live: a local path or any URI pyarrow's filesystems open.

`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `file:///...` and plain paths all become one
`Location` (a pyarrow filesystem plus a path in it), so layout discovery, label files, the
sample submission, exports, every image read and every output go through the same object.
Credentials come from each filesystem's standard chain (environment, profile, instance role;
`AWS_ENDPOINT_URL` for an S3-compatible server) and never from the URI, so no message, log or
summary can carry them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from planet_batch.errors import PlanetBatchError

log = logging.getLogger(__name__)

# Ray's own label for "this node" (ray.util.placement_group.NODE_ID_LABEL_KEY): Ray Data pins
# reads of `local://` paths to the driver's node with it, and so do we.
NODE_ID_LABEL = "ray.io/node-id"


class StorageError(PlanetBatchError, OSError):
    pass


def _one_line(e: BaseException) -> str:
    """pyarrow's messages can run to dozens of lines (libhdfs lists every JVM path it tried)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass(frozen=True)
class Location:
    """A file or folder: `path` inside `fs`; `scheme` is "" for a plain local path."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    @property
    def local(self) -> bool:
        """On the disk of the machine that opened it (a plain path or file://)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def parent(self) -> Location:
        return Location(self.fs, str(PurePosixPath(self.path).parent), self.scheme)

    def __truediv__(self, part: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{part}", self.scheme)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise StorageError(f"{self}: cannot {what}: {_one_line(e)}") from None

    def info(self) -> pafs.FileInfo:
        return self._call("read", self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        def read():
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return self._call("read", read)

    def entries(self, kind: pafs.FileType | None = None) -> list[Location]:
        """What is directly in this folder (only files or folders with `kind`), sorted; none when it does not exist.
        One listing (on an object store, one request per 1,000 entries)."""
        infos = self._call("list", self.fs.get_file_info, pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((Location(self.fs, i.path, self.scheme) for i in infos if kind is None or i.type == kind),
                      key=lambda loc: loc.path)

    def files(self, suffix: str) -> list[Location]:
        """The files directly in this folder whose names end with `suffix`, sorted."""
        return [f for f in self.entries(pafs.FileType.File) if f.path.endswith(suffix)]

    def write_atomic(self, write: Callable[[Path], object]) -> Location:
        """`write(tmp_path)` fills a local temp file, which then appears here whole or not at all.

        Locally a rename in the same folder; on an object store one PUT of the finished file
        (an object is never visible half-written there).
        """
        if self.local:
            write_atomic(Path(self.path), write)
            return self
        with tempfile.TemporaryDirectory(prefix="planet-batch-") as d:
            tmp = Path(d) / self.name
            write(tmp)
            self._call("write", pafs.copy_files, str(tmp), self.path, pafs.LocalFileSystem(), self.fs)
        return self

    def missing_bucket(self) -> str | None:
        """The bucket of an object-store location when that bucket does not exist (else None)."""
        bucket = self.path.split("/", 1)[0]
        if self.local or Location(self.fs, bucket, self.scheme).exists():
            return None
        return bucket

    def check_writable_folder(self) -> None:
        """Fail before any work when outputs cannot be written into this folder."""
        if self.local:
            folder = Path(self.path)
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise StorageError(f"cannot write to {folder}")
            return
        bucket = self.missing_bucket()
        if bucket:
            raise StorageError(f"{self}: bucket {bucket!r} does not exist")


def locate(where: str | os.PathLike | Location) -> Location:
    """A path or URI as a Location; an unknown scheme or credentials in the URI fail with one line."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if "://" not in text:
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
    parts = urllib.parse.urlsplit(text)
    if parts.password or (parts.username not in (None, "anonymous") and parts.scheme != "hdfs"):
        raise StorageError(f"{parts.scheme}://...: credentials do not go in the URI; use the environment, "
                           "a profile or the instance role (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as e:
        raise StorageError(f"{text}: cannot open ({_one_line(e)}); use a local path, s3://, gs://, hdfs:// "
                           "or file://") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Location(fs, path)  # file:///x is the local path /x
    return Location(fs, path.rstrip("/"), parts.scheme)


def existing_dir(where: str | os.PathLike | Location, what: str = "data root") -> Location:
    """A folder that must exist: a missing bucket, a missing prefix and denied access each get one line."""
    loc = locate(where)
    try:
        if loc.is_dir():
            return loc
        bucket = loc.missing_bucket()
    except StorageError as e:
        raise StorageError(f"{what} {e}") from None
    if loc.local:
        raise StorageError(f"{what} {loc} is not a directory")
    if bucket:
        raise StorageError(f"{what} {loc}: bucket {bucket!r} does not exist")
    raise StorageError(f"{what} {loc}: nothing under this prefix")


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _cpus_of(alive: list[dict], node: str) -> float:
    return next((n["Resources"].get("CPU", 0.0) for n in alive if n["NodeID"] == node), 0.0)


def read_placement(data: Location, shared: bool, what: str = "data") -> dict[str, str] | None:
    """Where the tasks that open (or write) `data`'s files may run: Ray's label selector, or None for anywhere.

    A URI is read on every node. A local path is known to exist only on the driver's node, so its
    reads are pinned there and decoded batches reach the other nodes through Ray's object store,
    unless `shared` says every node mounts it (NFS).
    """
    import ray

    if not data.local or shared:
        return None
    node = ray.get_runtime_context().get_node_id()
    alive = _alive_nodes()
    cpus = _cpus_of(alive, node)
    if cpus <= 0:  # (a head started with --num-cpus=0, as Ray advises for large clusters)
        raise StorageError(f"{what} {data} is local to node {node[:12]}, which has no CPU for the tasks that read it: "
                           "put it on s3:// (or pass --data-shared for a path every node mounts), or give that node "
                           "CPUs")
    if len(alive) > 1:
        log.info("%s is local to node %s: its tasks run there; put it on s3:// (or pass --data-shared for a path "
                 "every node mounts) to use it from every node", what, node[:12])
    return {NODE_ID_LABEL: node}


def elsewhere(placement: dict[str, str] | None, resource: str = "CPU") -> tuple[dict, dict]:
    """Where long-lived actors should run beside tasks pinned to one node (`placement`): on the other nodes when
    they have `resource`, so that the actors cannot take the CPUs the pinned tasks need (scoring with the data on
    a 1-CPU head stalled with its actors there: tests/cluster/test_cluster_storage.py), and on the pinned node
    only when no other node is left (a lost node's actors restart there, as they did before). Ray's actor
    options for that (label_selector with its fallback_strategy; none: anywhere) and the resources the actors
    share."""
    import ray

    if placement is None:
        return {}, ray.cluster_resources()
    node = placement[NODE_ID_LABEL]
    others = [n["Resources"] for n in _alive_nodes() if n["NodeID"] != node and n["Resources"].get(resource, 0.0) > 0]
    if not others:  # one node (a local Ray): everything shares it
        return {}, ray.cluster_resources()
    return ({"label_selector": {NODE_ID_LABEL: f"!{node}"}, "fallback_strategy": [{"label_selector": placement}]},
            {k: sum(r.get(k, 0.0) for r in others) for k in ("CPU", "GPU")})


def beside_reads(placement: dict[str, str] | None, workers: int, cpus_per_worker: float, gpu: bool = False,
                 groups: int = 1, autoscale: bool = False) -> list[dict[str, str]] | None:
    """Ray Train's label selector for each of `workers` when the reads are pinned to one node (`placement`): as many
    workers as leave DATA_CPUS of that node's CPUs to the reads may run anywhere, the others only on the other
    nodes; None when all of them fit (one node, a local Ray) or nothing is pinned. On a split-disk cluster whose
    data node had 1 CPU, SPREAD put a 1-CPU worker there and its decode tasks never got a CPU: training waited
    without end (tests/cluster/test_cluster_storage.py). `groups`: worker groups side by side (K folds), which
    share the data node's room. Workers the other nodes cannot hold are one line, before any work (unless the
    cluster autoscales: new nodes are other nodes)."""
    from planet_batch.cluster.runtime import DATA_CPUS, CapacityError, worker_room

    if placement is None or workers == 0:
        return None
    node = placement[NODE_ID_LABEL]
    alive = _alive_nodes()
    cpus = _cpus_of(alive, node)
    room = worker_room(cpus, cpus_per_worker) // groups
    if room >= workers:
        return None
    away = workers - room
    def held(r: dict) -> int:  # workers a node holds
        n = int(r.get("CPU", 0.0) / cpus_per_worker + 1e-9)
        return min(n, int(r.get("GPU", 0.0))) if gpu else n

    fit = sum(held(n["Resources"]) for n in alive if n["NodeID"] != node)
    if not autoscale and fit < away * groups:
        raise CapacityError(
            f"data local to node {node[:12]} ({cpus:g} CPUs, {DATA_CPUS} kept for its reads) leaves room there for "
            f"{room * groups} of the {workers * groups} workers, and the other nodes hold {fit} of the rest: lower "
            f"--workers{', --parallel-folds' if groups > 1 else ''} or --cpus-per-worker, or put the data on s3:// "
            "(or pass --data-shared for a path every node mounts)")
    return [{}] * room + [{NODE_ID_LABEL: f"!{node}"}] * away


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Push a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, write: Callable[[Path], object]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file.

    The file is fsynced before the rename and its folder after it, so that after a power loss the name holds the
    old file or the whole new one, never an empty one (a rename can reach the disk before the data it names).
    Measured on the 12 writes of a demo run (bench/atomic_writes.py): +0.3 ms a small file, +1.3-2.2 ms a 19 MB
    model.pt, 10.8 ms in all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)
