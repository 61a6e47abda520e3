"""Process and cluster plumbing shared by the jobs: logging, Ray start-up, capacity, threads."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path

from planet_batch.errors import PlanetBatchError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CurrentStderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when it writes: pytest and Ray swap the stream out."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(verbose: bool = False) -> None:
    """Give planet_batch's loggers one handler, once per process (entrypoints and Ray worker loops).

    Only our own logger is configured: raising the root logger to INFO inside Ray workers
    would also switch on Ray's internal INFO chatter.
    """
    logger = logging.getLogger("planet_batch")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local Ray."""
    import ray

    if not ray.is_initialized():
        joining = bool(os.environ.get("RAY_ADDRESS"))
        ctx = ray.init()
        # Ray's own default keeps a local dashboard and job API on 127.0.0.1, behind its token.
        log.info("%s Ray; dashboard: %s", "joined the" if joining else "started a local",
                 ctx.dashboard_url or "off")


class CapacityError(PlanetBatchError, RuntimeError):
    pass


def check_capacity(workers: int, cpus_per_worker: float, gpu: bool) -> None:
    """Fail before training when the workers cannot all be placed, or would starve Ray Data.

    Train workers that take every CPU leave none for the read/decode tasks, and Ray then
    waits forever without an error; that is worth refusing up front.
    """
    import ray

    if workers == 0:
        return
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    need_cpu = workers * cpus_per_worker
    if gpu and gpus < workers:
        raise CapacityError(f"{workers} GPU workers asked for, the cluster has {gpus:g} GPUs")
    if need_cpu > cpus:
        raise CapacityError(
            f"{workers} workers x {cpus_per_worker:g} CPUs = {need_cpu:g} CPUs asked for, the cluster has {cpus:g}"
        )
    if cpus - need_cpu < 1:
        raise CapacityError(
            f"{workers} workers x {cpus_per_worker:g} CPUs leave {cpus - need_cpu:g} of {cpus:g} CPUs for "
            f"Ray Data's read and decode tasks (at least 1 needed); lower --cpus-per-worker"
        )


def torch_threads(requested: int, cpu_share: float) -> int:
    """Ray sets OMP_NUM_THREADS=1 in workers; use the CPU share the worker was given instead."""
    return requested or max(1, math.ceil(cpu_share))


FAULT_DIR_ENV = "PLANET_BATCH_FAULT_DIR"


def fault_file(fault_dir: Path | str, point: str, state: str = "arm") -> Path:
    return Path(fault_dir) / f"{point.replace(':', '_').replace('/', '_')}.{state}"


def maybe_inject_fault(point: str) -> None:
    """Test-only: SIGKILL this process when a test has armed `point`.

    Tests set PLANET_BATCH_FAULT_DIR before Ray starts (so every worker inherits it) and
    arm a point by creating POINT.arm there; the first process to reach it renames the
    file to POINT.fired (atomic, so exactly one dies) and kills itself, and the retry
    passes. Outside tests the variable is unset and this is one dictionary lookup.
    """
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    try:
        os.rename(fault_file(fault_dir, point), fault_file(fault_dir, point, "fired"))
    except FileNotFoundError:
        return
    log.warning("fault injection: killing pid %d at %s", os.getpid(), point)
    os.kill(os.getpid(), signal.SIGKILL)
