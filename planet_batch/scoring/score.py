"""Batch scoring with Ray Data: image files -> read+decode tasks -> predictor actors -> Parquet shards -> outputs.

Images stream through the cluster and their rows (name, probabilities, ok, error) go from the actors
straight into Parquet shards in a work folder (`shards.WorkFolder`), so an interrupted run resumes:
the same command again scores only the images without a row. The driver then assembles the shards
into the submission's order with memory that does not grow with the number of images (`assemble`),
and writes every output through a temp file and a rename (or one PUT).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from planet_batch.cluster.runtime import ProgressLine, ensure_ray, quiet_data_progress
from planet_batch.cluster.storage import Location, StorageError, elsewhere, existing_dir, locate, read_placement
from planet_batch.config import ScoreConfig, to_dict
from planet_batch.data.labels import decode
from planet_batch.data.layout import LayoutError, find_layout, image_files, submission_order, test_images
from planet_batch.data.submission import write_submission
from planet_batch.data.transforms import decode_batch
from planet_batch.scoring import ScoreError
from planet_batch.scoring.assemble import Assembled, AssemblyError, assemble
from planet_batch.scoring.predictor import (
    Ensemble,
    Predictor,
    actor_gpus,
    actor_mode,
    fingerprint,
    load_ensemble,
    predictor_memory,
)
from planet_batch.scoring.shards import WorkFolder
from planet_batch.tracking import Run, Tracker, flat_params, tracked

log = logging.getLogger(__name__)


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
    resumed_images: int  # rows taken from an earlier, interrupted run
    scored_images: int  # rows computed by this run
    precision: str | None  # how this run's actors computed: fp32 | bf16 (None: nothing left to score)
    compiled: bool | None


@dataclass(frozen=True)
class Inputs:
    """What a run must score: image names in submission order, and every image file."""

    order: list[str]
    files: list[Location]
    folders: list[Location]


def expected_images(cfg: ScoreConfig) -> Inputs:
    """The images to score, checked before Ray starts."""
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
        return Inputs(order, [paths[n] for n in order], list(layout.test_dirs))
    try:
        folder = existing_dir(cfg.images, "--images")
    except StorageError as e:
        raise LayoutError(str(e)) from None
    files = image_files(folder)
    if not files:
        raise LayoutError(f"no .jpg images in {folder}")
    return Inputs(submission_order([p.stem for p in files]), files, [folder])


def default_actors(resources: dict, gpus_per_actor: float) -> int:
    """One actor per GPU; on CPUs one single-threaded actor per core.

    Measured on 2 cores (resnet34@128): two 1-thread actors keep the model at ~97% of its
    pure forward rate, one 2-thread actor at ~85%, because every stall of one thread (Ray's
    own processes, decode tasks, result transfers) holds up the other at each op's barrier.
    """
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    return max(1, int(resources.get("CPU", 1)))


def check_outputs(cfg: ScoreConfig) -> Location:
    """Where the submission goes. Every file the run will write is checked before any work, so nothing fails after
    hours of scoring: each folder must be writable and no output a folder; the submission and --probs-out must not
    exist without --overwrite (its side files, score_summary.json and bad_images.csv, are replaced with it).
    Returns the submission's location."""
    out = locate(cfg.out)
    sides = [out.with_name("score_summary.json"), out.with_name("bad_images.csv")]
    named = [out, *([locate(cfg.probs_out)] if cfg.probs_out else [])]
    if len({str(o) for o in [*named, *sides]}) < len(named) + len(sides):
        raise ScoreError(f"--probs-out {cfg.probs_out} is one of the run's other outputs ({out} and next to it "
                         "score_summary.json, bad_images.csv); give it another name")
    for o in [*named, *sides]:
        if o in named and not cfg.overwrite and o.exists():
            raise ScoreError(f"{o} exists; pass --overwrite to replace it")
        if o.is_dir():
            raise ScoreError(f"{o} is a folder; the output is a file")
        o.parent.check_writable_folder()
    return out


def open_work_folder(cfg: ScoreConfig, out: Location, ensemble: Ensemble, weights: list[bytes],
                     inputs: Inputs) -> WorkFolder:
    """The shards' folder (--work-dir, default next to the submission), refusing rows of another setup.

    Thresholds are applied at assembly, so they may change between runs; the weights, size, TTA and
    inputs may not.
    """
    run = {"models": sorted(fingerprint(w) for w in weights), "size": ensemble.size, "tta": cfg.tta,
           "precision": actor_mode(cfg, actor_gpus(cfg.gpus_per_actor, None), 0).precision,
           "tags": sorted(" ".join(m.tags) for m in ensemble.members),
           "inputs": sorted(str(f) for f in inputs.folders)}
    try:
        return WorkFolder.open(cfg.work_dir or out.with_name(out.name + ".parts"), run, cfg.overwrite)
    except StorageError as e:  # (a WorkFolderError says which folder itself)
        raise ScoreError(f"work folder: {e}") from None


def scoring_pipeline(cfg: ScoreConfig, ensemble: Ensemble, states: list[dict], sources: list[Location],
                     placement: dict | None, n_images: int, where: str):
    """The files still to score -> read+decode tasks (on the data's node when only it has the files) -> predictor
    actors (then on the other nodes: the pinned tasks keep that node's CPUs). Returns the
    dataset and the actors' mode."""
    import ray

    gpus = actor_gpus(cfg.gpus_per_actor, ray.cluster_resources())
    actor_options, room = elsewhere(placement, "GPU" if gpus else "CPU")
    actors = cfg.actors or default_actors(room, gpus)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // actors)
    mode = actor_mode(cfg, gpus, n_images / actors)
    log.info("scoring %d images from %s with %s on %d actor(s), %d torch threads each, %s%s%s", n_images, where,
             ensemble, actors, threads, mode.precision, ", compiled" if mode.compile else "",
             ", TTA x8" if cfg.tta else "")
    # Whole read blocks (batch_size=None) let Ray Data fuse reading and decoding into one task,
    # so raw bytes never pass through the object store and no extra worker process starts;
    # the fused task inherits the read's placement.
    # The files the checks listed (layout.image_files), never a folder: Ray Data's folder reads recurse and would
    # read what the checks did not see. (Ray sizes a list of paths with a stat each on a local disk; on an object
    # store with one listing when they share a folder, else with parallel requests: its _expand_paths.)
    ds = ray.data.read_binary_files([f.path for f in sources], filesystem=sources[0].fs, include_paths=True,
                                    label_selector=placement)
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": ensemble.size, "keep_bad": True},
                        batch_size=None, batch_format="numpy")
    return mode, ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"ensemble": ensemble, "state_refs": [ray.put(s) for s in states], "threads": threads,
                               "tta": cfg.tta, "precision": mode.precision, "compile": mode.compile,
                               "batch_size": mode.batch_size},
        batch_size=mode.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
        memory=predictor_memory(states),
        # A dead actor is restarted and its batch retried (Ray Data's defaults, without a count: the
        # per-call max_restarts/max_task_retries are deprecated); a batch that keeps killing its actor
        # stops delivering, and the stall timeout fails the job.
        **actor_options,
    )


class ShardProgress:
    """A progress line from the committed shards (what a rerun keeps) while Ray Data writes them."""

    POLL_S = 2.0

    def __init__(self, work: WorkFolder, total: int, resumed: int):
        self.work = work
        self.line = ProgressLine("images scored", total, done=resumed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shard-progress", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                done = self.work.committed_rows()
            except StorageError as e:
                log.debug("progress: %s", e)
                continue
            if done > self.line.done:
                self.line.update(done - self.line.done)

    def __enter__(self) -> ShardProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# A shard write is a few hundred rows of 17 floats. At Ray Data's default of one CPU a write task found no room
# beside the read tasks and the actors on 2 cores until every image was predicted (6,000 images: every shard in
# the run's last 1-3 s), so an interrupted run kept nothing and the progress line stood at 0 until the end. At a
# quarter of a CPU the shards land as they fill (1,000 rows: one every 8-9 s), for 5-16% more wall time on
# these 2 cores (resnet18 and resnet34 @128, 250- and 1,000-row shards, two runs each); a GPU node's CPUs have
# room for both.
WRITE_CPUS = 0.25


def write_shards(ds, work: WorkFolder, cfg: ScoreConfig, placement: dict | None, total: int, resumed: int) -> None:
    """Run the pipeline into Parquet shards with Ray Data's two-phase-commit checkpointing (see shards.py).

    A local work folder on a cluster whose nodes do not share it gets its writes pinned to the driver's
    node, like the reads of local data. Ray Data does not fail when its work cannot be placed: after a node is
    lost, the restarted actors can hold every CPU the read tasks need. Its no-progress guard ends such a run after
    --stall-timeout (no block moved, so no new shard).
    """
    from ray.data.exceptions import ExecutionTimeoutError

    ds.context.checkpoint_config = work.checkpoint_config()
    ds.context.execution_no_progress_timeout_s = cfg.stall_timeout_s or -1  # (-1: Ray's "wait forever")
    ray_remote_args = {"num_cpus": WRITE_CPUS} | ({"label_selector": placement} if placement else {})
    progress = ShardProgress(work, total, resumed)
    try:
        with progress:
            ds.write_parquet(work.shards.path, filesystem=work.shards.fs, min_rows_per_file=cfg.shard_rows,
                             ray_remote_args=ray_remote_args)
    except ExecutionTimeoutError:
        raise ScoreError(
            f"no new shard in {cfg.stall_timeout_s:g} s ({progress.line}): the cluster cannot place the work; a "
            "lost node, or too few CPUs for the actors plus the read tasks; the shards so far are kept, rerun "
            "the same command to resume") from None
    except KeyboardInterrupt:
        log.info("the shards written so far are kept in %s: the same command resumes", work.root)
        raise


def write_outputs(rows: Assembled, out: Location, threshold, cfg: ScoreConfig,
                  tags: Sequence[str]) -> tuple[Location | None, Location | None]:
    """bad_images.csv (if any), then the submission and --probs-out, each streamed from the assembled rows;
    --strict stops before the submission."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    bad_path = out.with_name("bad_images.csv") if rows.unreadable else None
    if bad_path:
        def write_bad(p: Path):
            with p.open("w") as f:
                f.write("image_name,error\n")
                for t in rows.tables():
                    bad = t.filter(pc.invert(t["ok"]))
                    f.writelines(f"{n},{json.dumps(e)}\n" for n, e in zip(bad["image_name"].to_pylist(),
                                                                           bad["error"].to_pylist()))

        bad_path.write_atomic(write_bad)
        log.warning("%d unreadable images (empty tag sets), listed in %s", rows.unreadable, bad_path)
        if cfg.strict:
            raise ScoreError(f"{rows.unreadable} unreadable images (--strict), listed in {bad_path}; "
                             "no submission written")

    def submission_rows() -> Iterator[list[tuple[str, str]]]:
        for t in rows.tables():
            decisions = decode(np.column_stack([t[tag].to_numpy() for tag in tags]), threshold)
            yield [(n, d if ok else "") for n, d, ok in zip(t["image_name"].to_pylist(), decisions,
                                                            t["ok"].to_pylist())]

    write_submission(out, submission_rows())
    probs_path = locate(cfg.probs_out) if cfg.probs_out else None
    if probs_path:
        schema = pa.schema([("image_name", pa.string()), *[(tag, pa.float32()) for tag in tags]])

        def write_probs(p: Path):
            with pq.ParquetWriter(p, schema) as w:
                for t in rows.tables():
                    w.write_table(t.select(schema.names).cast(schema))

        probs_path.write_atomic(write_probs)
    return bad_path, probs_path


def chunks(items: Sequence, n: int = 65_536) -> Iterator[Sequence]:
    return (items[i:i + n] for i in range(0, len(items), n))


def run_scoring(cfg: ScoreConfig, tracker: Tracker | None = None) -> ScoreSummary:
    """Score the images of `cfg` into a submission: every check first, then Ray writes shards (only for
    images without a row from an earlier run), then the outputs are assembled from the shards. `tracker`: the
    run and its summary in MLflow, tagged with the training runs of the models."""
    t0 = time.perf_counter()
    ensemble = load_ensemble(cfg.model)
    inputs = expected_images(cfg)
    out = check_outputs(cfg)
    weights = [m.weights.read_bytes() for m in ensemble.members]  # read once: fingerprint and state
    states = [m.load_state(w) for m, w in zip(ensemble.members, weights)]
    for m, state in zip(ensemble.members, states):
        m.check_state(state)
    work = open_work_folder(cfg, out, ensemble, weights, inputs)
    with tracked(open_score_run(tracker, cfg, ensemble, out)) as run:
        summary = score(cfg, ensemble, states, inputs, work, out, t0)
    finish_score_run(run, summary, cfg, out, tracker is not None and tracker.options.log_submission)
    return summary


def score(cfg: ScoreConfig, ensemble: Ensemble, states: list[dict], inputs: Inputs, work: WorkFolder,
          out: Location, t0: float) -> ScoreSummary:
    """The images still without a row through Ray into shards, then the outputs and their summary."""
    threshold = ensemble.thresholds if cfg.threshold == "tuned" else float(cfg.threshold)
    done = work.recover()
    todo = [f for f in inputs.files if f.path not in done]
    resumed = len(inputs.files) - len(todo)
    if resumed:
        log.info("resuming: %d of %d images already scored in %s; scoring the other %d",
                 resumed, len(inputs.files), work.root, len(todo))
    mode = None
    if todo:
        ensure_ray()
        quiet_data_progress()
        placement = read_placement(inputs.folders[0], cfg.data_shared)
        mode, ds = scoring_pipeline(cfg, ensemble, states, todo, placement, len(todo),
                                    ", ".join(map(str, inputs.folders)))
        write_shards(ds, work, cfg, read_placement(work.root, cfg.data_shared, "the work folder"),
                     len(inputs.files), resumed)

    tmp_root = work.root.path if work.root.local else None  # spill next to the shards, on their disk
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=tmp_root) as tmp:
        try:
            rows = assemble(chunks(inputs.order), work.shard_files(), len(inputs.order), Path(tmp), ensemble.tags)
        except AssemblyError as e:
            raise ScoreError(f"{work.root}: {e}") from None
        bad_path, probs_path = write_outputs(rows, out, threshold, cfg, ensemble.tags)

    wall = time.perf_counter() - t0
    summary = ScoreSummary(
        output=str(out), images=len(inputs.order), scored=len(inputs.order) - rows.unreadable,
        unreadable=rows.unreadable, wall_s=round(wall, 2), images_per_s=round(len(inputs.order) / wall, 1),
        threshold=cfg.threshold, tta=cfg.tta, bad_images=str(bad_path) if bad_path else None,
        probs=str(probs_path) if probs_path else None, resumed_images=resumed, scored_images=len(todo),
        precision=mode and mode.precision, compiled=mode and mode.compile,
    )
    out.with_name("score_summary.json").write_atomic(lambda p: p.write_text(
        json.dumps({**asdict(summary), "config": to_dict(cfg)}, indent=2)))
    if not cfg.keep_parts:
        work.remove()
    log.info("scored %d images (%d unreadable, %d resumed) in %.1f s, %.1f images/s -> %s",
             summary.images, summary.unreadable, resumed, wall, summary.images_per_s, out)
    return summary


def open_score_run(tracker: Tracker | None, cfg: ScoreConfig, ensemble: Ensemble, out: Location) -> Run | None:
    if tracker is None:
        return None
    runs = ",".join(r for r in ensemble.runs if r)
    return tracker.open(f"score {out.name}", params=flat_params(to_dict(cfg)),
                        tags={"planet_batch.job": "score", "planet_batch.models": str(ensemble)}
                        | ({"planet_batch.training_runs": runs} if runs else {}))


def finish_score_run(run: Run | None, summary: ScoreSummary, cfg: ScoreConfig, out: Location,
                     log_submission: bool) -> None:
    """The summary as metrics (and score_summary.json), the submission on request."""
    if run is None:
        return
    run.log_metrics({k: getattr(summary, k) for k in ("images", "scored", "unreadable", "wall_s", "images_per_s",
                                                      "resumed_images", "scored_images")}
                    | ({"threshold": float(cfg.threshold)} if cfg.threshold != "tuned" else {})
                    | ({"compiled": int(summary.compiled)} if summary.compiled is not None else {}))
    run.set_tags({"precision": summary.precision or "none", "threshold": cfg.threshold, "tta": cfg.tta})
    with tempfile.TemporaryDirectory() as d:  # the outputs may be on a bucket
        files = [out.with_name("score_summary.json"), *([out] if log_submission else [])]
        for f in files:
            (Path(d) / f.name).write_bytes(f.read_bytes())
        run.log_artifacts(Path(d) / f.name for f in files)
    run.finish()
