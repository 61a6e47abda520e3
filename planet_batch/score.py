"""Batch scoring with Ray Data: files -> read+decode tasks -> predictor actors -> submission.csv.

Images stream through the cluster; the driver only gathers each image's name and 17
probabilities (about 70 bytes a row), puts the rows into the sample submission's order,
and writes every output through a temp file and a rename.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from planet_batch.config import ScoreConfig, to_dict
from planet_batch.errors import PlanetBatchError
from planet_batch.export import ExportedModel, load_export
from planet_batch.labels import TAGS, decode
from planet_batch.layout import LayoutError, find_layout, submission_order, test_images
from planet_batch.model import inference
from planet_batch.runtime import ProgressLine, ensure_ray, maybe_inject_fault, quiet_data_progress, setup_logging
from planet_batch.storage import Location, StorageError, existing_dir, locate, read_placement
from planet_batch.submission import write_submission
from planet_batch.transforms import decode_batch, dihedral, to_model_input

log = logging.getLogger(__name__)


class ScoreError(PlanetBatchError, RuntimeError):
    pass


@dataclass(frozen=True)
class ScoreSummary:
    output: str | None
    images: int
    scored: int
    unreadable: int
    wall_s: float
    images_per_s: float
    threshold: str
    tta: bool
    bad_images: str | None
    probs: str | None


class Predictor:
    """A Ray Data actor: the model is built once per actor, then scores batch after batch.

    The weights come as an object-store reference inside a list, which Ray does not resolve into the
    constructor call: the constructor's own arguments stay small, so Ray can restart a lost actor from
    them (it warns about, and cannot always restart, actors whose arguments live in the object store),
    and the actor fetches the weights itself, from whichever node holds them.
    """

    def __init__(self, export: ExportedModel, state_ref: list, threads: int, tta: bool):
        import ray
        import torch

        setup_logging()
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = export.build_from_state(ray.get(state_ref[0]), self.device)
        self.export, self.views, self.batches = export, range(8) if tta else range(1), 0

    def __call__(self, batch: dict) -> dict:
        import torch

        maybe_inject_fault(f"score:batch:{self.batches}")
        self.batches += 1
        ok = batch["ok"]
        probs = np.zeros((len(ok), len(self.export.tags)), dtype=np.float32)
        if ok.any():
            images = batch["image"][ok]
            with inference(self.device):
                total = 0
                for k in self.views:  # TTA: the same 8 dihedral views that training augments with
                    x = to_model_input(np.ascontiguousarray(dihedral(images, k)), self.device, self.export.mean,
                                       self.export.std)
                    total = total + torch.sigmoid(self.model(x).float())
            probs[ok] = (total / len(self.views)).cpu().numpy()
        return {"name": batch["name"], "probs": probs, "ok": ok, "error": batch["error"]}


def expected_images(cfg: ScoreConfig) -> tuple[list[str], list[Location]]:
    """The image names in submission order and the folders to read, checked before Ray starts."""
    if cfg.data is not None:
        layout = find_layout(cfg.data, need=("test",))
        order, paths = test_images(layout)
        missing = [n for n in order if n not in paths]
        if missing:
            raise LayoutError(f"{len(missing)} images of the sample submission are not in "
                              f"{', '.join(map(str, layout.test_dirs))}, first: {missing[:3]}")
        extra = set(paths) - set(order)
        if extra:
            raise LayoutError(f"{len(extra)} test images are not in the sample submission "
                              f"{layout.sample_submission}, first: {sorted(extra)[:3]}")
        return order, list(layout.test_dirs)
    try:
        folder = existing_dir(cfg.images, "--images")
    except StorageError as e:
        raise LayoutError(str(e)) from None
    names = [p.stem for p in folder.files(".jpg")]
    if not names:
        raise LayoutError(f"no .jpg images in {folder}")
    return submission_order(names), [folder]


def batches_or_stall(ds, timeout_s: float, progress: Callable[[], str]) -> Iterator[dict]:
    """The dataset's batches; a ScoreError once none has arrived for `timeout_s` (0: no limit).

    Ray Data does not fail when its work cannot be placed: after a node is lost, the restarted
    actors can hold every CPU the read tasks need and the job would wait forever. The alarm
    raises in the main thread, inside Ray Data's iterator, which then shuts its execution down
    as it does for Ctrl-C. Off the main thread (no signals there) there is no limit.
    """
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        yield from batches
        return

    def stalled(signum, frame):
        raise ScoreError(f"no scored batch in {timeout_s:g} s ({progress()}): the cluster cannot place the work; "
                         "a lost node, or too few CPUs for the actors plus the read tasks (see Ray Data's progress "
                         "above); no output written")

    t0, (outer_left, _) = time.monotonic(), signal.getitimer(signal.ITIMER_REAL)  # e.g. pytest-timeout's
    previous = signal.signal(signal.SIGALRM, stalled)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        for batch in batches:
            signal.setitimer(signal.ITIMER_REAL, 0)  # the consumer's own time is not a stall
            yield batch
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - t0), 0.001))


def default_actors(resources: dict, gpus_per_actor: float) -> int:
    """One actor per GPU; on CPUs one single-threaded actor per core.

    Measured on 2 cores (resnet34@128): two 1-thread actors keep the model at ~97% of its
    pure forward rate, one 2-thread actor at ~85%, because every stall of one thread (Ray's
    own processes, decode tasks, result transfers) holds up the other at each op's barrier.
    """
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    return max(1, int(resources.get("CPU", 1)))


@dataclass(frozen=True)
class Scores:
    """Every expected image's probabilities, in submission order, and the unreadable ones with their reasons."""

    names: list[str]
    probs: np.ndarray  # (images, tags)
    bad: dict[str, str]


def check_output(cfg: ScoreConfig) -> Location:
    """Where the submission goes, refused before any work when it exists (without --overwrite) or cannot be written."""
    out = locate(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ScoreError(f"{out} exists; pass --overwrite to replace it")
    out.parent.check_writable_folder()
    return out


def scoring_pipeline(cfg: ScoreConfig, export: ExportedModel, state: dict, folders: list[Location], n_images: int):
    """files -> read+decode tasks (on the data's node when only it has the files) -> predictor actors."""
    import ray

    actors = cfg.actors or default_actors(ray.cluster_resources(), cfg.gpus_per_actor)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // actors)
    log.info("scoring %d images from %s with %s@%d on %d actor(s), %d torch threads each%s",
             n_images, ", ".join(map(str, folders)), export.arch, export.size, actors, threads,
             ", TTA x8" if cfg.tta else "")
    # Whole read blocks (batch_size=None) let Ray Data fuse reading and decoding into one task,
    # so raw bytes never pass through the object store and no extra worker process starts;
    # the fused task inherits the read's placement.
    ds = ray.data.read_binary_files([f.path for f in folders], filesystem=folders[0].fs, include_paths=True,
                                    file_extensions=["jpg"], label_selector=read_placement(folders[0], cfg.data_shared))
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": export.size, "keep_bad": True},
                        batch_size=None, batch_format="numpy")
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"export": export, "state_ref": [ray.put(state)], "threads": threads, "tta": cfg.tta},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        # A dead actor is restarted and its batch retried (Ray Data's defaults, without a count: the
        # per-call max_restarts/max_task_retries are deprecated); a batch that keeps killing its actor
        # stops delivering, and the stall timeout fails the job.
    )


def collect_scores(ds, order: list[str], stall_timeout_s: float) -> Scores:
    """Each image's row from the stream, checked: every expected image exactly once."""
    probs: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    progress = ProgressLine("images scored", len(order))
    for batch in batches_or_stall(ds, stall_timeout_s, lambda: str(progress)):
        progress.update(len(batch["name"]))
        for name, p, ok, err in zip(batch["name"], batch["probs"], batch["ok"], batch["error"]):
            if name in probs:
                raise ScoreError(f"{name} was scored twice: the input holds two files of that name")
            probs[name] = p
            if not ok:
                bad[name] = err
    missing = [n for n in order if n not in probs]
    if missing or len(probs) != len(order):
        raise ScoreError(f"scored {len(probs)} images for {len(order)} expected; missing e.g. {missing[:3]}")
    return Scores(order, np.stack([probs[n] for n in order]), bad)


def write_outputs(
    scores: Scores, out: Location, threshold, cfg: ScoreConfig, tags
) -> tuple[Location | None, Location | None]:
    """bad_images.csv (if any), then the submission and --probs-out; --strict stops before the submission."""
    bad_path = out.with_name("bad_images.csv") if scores.bad else None
    if bad_path:
        bad_path.write_atomic(lambda p: p.write_text(
            "image_name,error\n" + "".join(f"{n},{json.dumps(e)}\n" for n, e in sorted(scores.bad.items()))))
        log.warning("%d unreadable images (empty tag sets), listed in %s", len(scores.bad), bad_path)
        if cfg.strict:
            raise ScoreError(f"{len(scores.bad)} unreadable images (--strict), listed in {bad_path}; "
                             "no submission written")
    decisions = decode(scores.probs, threshold)
    write_submission(out, scores.names, ["" if n in scores.bad else d for n, d in zip(scores.names, decisions)])
    probs_path = locate(cfg.probs_out) if cfg.probs_out else None
    if probs_path:
        write_probs(probs_path, scores.names, scores.probs, tags)
    return bad_path, probs_path


def run_scoring(cfg: ScoreConfig) -> ScoreSummary:
    """Score the images of `cfg` into a submission: every check first, then Ray, then the outputs."""
    t0 = time.perf_counter()
    export = load_export(cfg.model)
    order, folders = expected_images(cfg)
    out = check_output(cfg)
    threshold = np.asarray(export.thresholds) if cfg.threshold == "tuned" else float(cfg.threshold)
    state = export.load_state()

    ensure_ray()
    quiet_data_progress()
    ds = scoring_pipeline(cfg, export, state, folders, len(order))
    scores = collect_scores(ds, order, cfg.stall_timeout_s)
    bad_path, probs_path = write_outputs(scores, out, threshold, cfg, export.tags)

    wall = time.perf_counter() - t0
    summary = ScoreSummary(
        output=str(out), images=len(order), scored=len(order) - len(scores.bad), unreadable=len(scores.bad),
        wall_s=round(wall, 2), images_per_s=round(len(order) / wall, 1), threshold=cfg.threshold, tta=cfg.tta,
        bad_images=str(bad_path) if bad_path else None, probs=str(probs_path) if probs_path else None,
    )
    out.with_name("score_summary.json").write_atomic(lambda p: p.write_text(
        json.dumps({**asdict(summary), "config": to_dict(cfg)}, indent=2)))
    log.info("scored %d images (%d unreadable) in %.1f s, %.1f images/s -> %s",
             summary.images, summary.unreadable, wall, summary.images_per_s, out)
    return summary


def write_probs(path: Location, names: list[str], probs: np.ndarray, tags=TAGS) -> Location:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image_name": names, **{t: probs[:, j] for j, t in enumerate(tags)}})
    return path.write_atomic(lambda p: pq.write_table(table, p))
