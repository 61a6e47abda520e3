"""Process and cluster plumbing shared by the jobs: logging, Ray start-up, capacity, threads."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
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

    Only our own logger is configured here, and it does not propagate: the level of Ray's own
    Python loggers is set by `ensure_ray`, for the driver and every worker of the job.
    """
    logger = logging.getLogger("planet_batch")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def verbose() -> bool:
    """Whether this run was asked for --verbose (our own logger is at DEBUG then)."""
    return logging.getLogger("planet_batch").getEffectiveLevel() <= logging.DEBUG


def quiet_ray_console() -> None:
    """Ray's console output at WARNING, its log files complete: in the driver and, as Ray's
    `worker_process_setup_hook`, in every worker process of the job.

    Ray Data configures its own loggers (file: everything, in the session's ray-data.log; console:
    INFO), so its console handlers are lowered here after importing it; deprecation warnings that
    Ray's own code raises against Ray (e.g. Ray Train's use of `ExecutionOptions.exclude_resources`)
    are not ours to fix and are hidden. A deprecated call of ours is attributed to our module, and
    still shows.
    """
    import warnings

    import ray.data  # noqa: F401 - sets up Ray Data's loggers now, so that the levels below stick
    from ray.util.annotations import RayDeprecationWarning

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session files stay complete
            handler.setLevel(logging.WARNING)
    # Its hint that progress bars are off (we turn them off: the epoch table and ProgressLine report).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Its warning that a dataset "will hang" when no CPU is free the moment it starts: with K folds side by
    # side another fold's tasks hold the free CPU for a moment, and they end; check_capacity refuses the
    # worker groups that would really starve Ray Data.
    logging.getLogger("ray.data.dataset").addFilter(
        lambda record: "does not have any available CPUs" not in record.getMessage())
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"ray\.")


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local Ray.

    The console is for people: Ray's Python loggers, in this process and in every task and actor of
    the job, print warnings and errors only (`--verbose`: everything, as Ray's default). Ray's own
    processes keep writing their full logs to the session folder (/tmp/ray/session_latest/logs).
    """
    import ray

    if not ray.is_initialized():
        joining = bool(os.environ.get("RAY_ADDRESS"))
        quiet = not verbose()
        # The hook runs in every worker process of this job, locally and on a cluster (merged with
        # the job's own runtime_env under `ray job submit`); it needs planet_batch on every node,
        # as cluster.yaml installs it.
        ctx = ray.init(logging_config=ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
                       runtime_env={"worker_process_setup_hook": "planet_batch.cluster.runtime.quiet_ray_console"}
                       if quiet else None)
        if quiet:
            quiet_ray_console()
        stop_on_sigterm()
        # Ray's own default keeps a local dashboard and job API on 127.0.0.1, behind its token.
        log.info("%s Ray; dashboard: %s", "joined the" if joining else "started a local",
                 ctx.dashboard_url or "off")


_stopped_by: list[int] = []  # SIGTERM once the handler below has run


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler) stops the job as Ctrl-C does: a KeyboardInterrupt, on which Ray Data
    and Ray Train shut their work down, and the CLI's one line (`stopped_by` tells the two apart).

    `ray.init` leaves SIGTERM to the core worker's failure handler, which prints a C++ stack and aborts
    (exit -6) without shutting anything down; a scheduler's stop is an ordinary request, not a crash.
    Signal handlers belong to the main thread; elsewhere Ray's stays.
    """
    def terminate(signum, frame):
        _stopped_by.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


@contextlib.contextmanager
def sigint_kept() -> Iterator[None]:
    """The main thread's SIGINT handler as it was before the block, whatever the block installs (Ray Train's
    `fit` leaves its own, so a later Ctrl-C would abort a finished run's dead controller and exit 0). Off the main
    thread handlers cannot change: nothing happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def stopped_by() -> int:
    """The signal that interrupted this process: SIGTERM if `stop_on_sigterm`'s handler ran, else SIGINT."""
    return _stopped_by[-1] if _stopped_by else signal.SIGINT


def quiet_data_progress() -> None:
    """No Ray Data progress bars or execution banners: the epoch table and scoring's `ProgressLine` report."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class ProgressLine:
    """One log line every `every_s` seconds: items done of the total, rate, time left and a `detail`. With
    `longer_than_s`, only for work on course to take longer than that (a short epoch prints no progress)."""

    def __init__(self, what: str, total: int, every_s: float = 10.0, done: int = 0, label: str = "",
                 longer_than_s: float = 0.0):
        self.what, self.total, self.every_s, self.label, self.longer_than_s = what, total, every_s, label, longer_than_s
        self.done = self.start = done  # `done` already at the start (a resumed run): not in the rate
        self.t0 = self.last = time.perf_counter()

    def __str__(self) -> str:
        return f"{self.label}{self.done:,} of {self.total:,} {self.what}"

    def update(self, n: int, detail: str | Callable[[], str] = "") -> None:
        """`n` more done; `detail` (or what it returns: made only when a line is printed) ends the line."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            rate = (self.done - self.start) / (now - self.t0)
            if rate and (self.total - self.start) / rate < self.longer_than_s:
                return
            self.last = now
            left = int((self.total - self.done) / rate) if rate else 0
            detail = detail() if callable(detail) else detail
            log.info("%s, %.1f/s, %d:%02d left%s", self, rate, left // 60, left % 60, f", {detail}" if detail else "")


class CapacityError(PlanetBatchError, RuntimeError):
    pass


# CPUs a training job leaves to Ray Data's read and decode tasks: Train workers that take every CPU leave none,
# and Ray then waits forever without an error.
DATA_CPUS = 1


def worker_room(cpus: float, cpus_per_worker: float) -> int:
    """How many workers of `cpus_per_worker` CPUs fit in `cpus` CPUs and leave DATA_CPUS of them to Ray Data."""
    return max(0, int((cpus - DATA_CPUS) / cpus_per_worker + 1e-9))  # (1e-9: 0.3 * 3 < 0.9)


def runs_that_fit(workers: int, cpus_per_worker: float, gpu: bool, most: int) -> int:
    """How many runs' worker groups (K folds, a search's trials) the cluster holds at once, leaving DATA_CPUS to
    Ray Data's decode tasks as `check_capacity` does for one run; at least 1, at most `most`."""
    import ray

    res = ray.cluster_resources()
    fit = worker_room(res.get("CPU", 0.0), cpus_per_worker) // max(1, workers)
    if gpu:
        fit = min(fit, int(res.get("GPU", 0.0) // max(1, workers)))
    return max(1, min(most, fit))


def check_capacity(workers: int, cpus_per_worker: float, gpu: bool) -> None:
    """Fail before training when the workers cannot all be placed, or would leave Ray Data less than DATA_CPUS."""
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
    if worker_room(cpus, cpus_per_worker) < workers:
        raise CapacityError(
            f"{workers} workers x {cpus_per_worker:g} CPUs leave {cpus - need_cpu:g} of {cpus:g} CPUs for "
            f"Ray Data's read and decode tasks (at least {DATA_CPUS} needed); lower --cpus-per-worker"
        )


def torch_threads(requested: int, cpu_share: float) -> int:
    """Ray sets OMP_NUM_THREADS=1 in workers; use the CPU share the worker was given instead."""
    return requested or max(1, math.ceil(cpu_share))


FAULT_DIR_ENV = "PLANET_BATCH_FAULT_DIR"


def fault_file(fault_dir: Path | str, point: str, state: str = "arm") -> Path:
    return Path(fault_dir) / f"{point.replace(':', '_').replace('/', '_')}.{state}"


def maybe_inject_fault(point: str) -> None:
    """Test-only: SIGKILL this process, or hang it, when a test has armed `point`.

    Tests set PLANET_BATCH_FAULT_DIR before Ray starts (so every worker inherits it) and
    arm a point by creating POINT.arm (a kill), POINT.hang (this process stops there, until it is killed) or
    POINT.pause (it waits there until the test deletes POINT.paused, and is killed there when the test armed
    the point again meanwhile); the first process to reach it renames the file to POINT.fired, POINT.hanging or
    POINT.paused (atomic, so exactly one is hit), and the retry or rerun passes. Outside tests the variable is
    unset and this is one lookup.
    """
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    for armed, hit in (("arm", "fired"), ("hang", "hanging"), ("pause", "paused")):
        try:
            os.rename(fault_file(fault_dir, point, armed), fault_file(fault_dir, point, hit))
        except FileNotFoundError:
            continue
        if armed == "arm":
            log.warning("fault injection: killing pid %d at %s", os.getpid(), point)
            os.kill(os.getpid(), signal.SIGKILL)
        log.warning("fault injection: pid %d %s at %s", os.getpid(), "hangs" if armed == "hang" else "pauses", point)
        while armed == "hang" or fault_file(fault_dir, point, hit).exists():
            time.sleep(0.2)
        return maybe_inject_fault(point)
