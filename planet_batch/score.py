"""Batch scoring with Ray Data: image files -> read+decode tasks -> predictor actors -> Parquet shards -> outputs.

Images stream through the cluster and their rows (name, probabilities, ok, error) go from the actors
straight into Parquet shards in a work folder (`shards.WorkFolder`), so an interrupted run resumes:
the same command again scores only the images without a row. The driver then assembles the shards
into the submission's order with memory that does not grow with the number of images (`assemble`),
and writes every output through a temp file and a rename (or one PUT).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from planet_batch.assemble import Assembled, AssemblyError, assemble
from planet_batch.config import ScoreConfig, to_dict
from planet_batch.errors import PlanetBatchError
from planet_batch.export import EnsembleExport, ExportedModel, load_model
from planet_batch.labels import decode
from planet_batch.layout import LayoutError, find_layout, submission_order, test_images
from planet_batch.model import compile_or_eager, inference, resolve_precision
from planet_batch.runtime import ProgressLine, ensure_ray, maybe_inject_fault, quiet_data_progress, setup_logging
from planet_batch.shards import ID_COLUMN, WorkFolder
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
    resumed_images: int  # rows taken from an earlier, interrupted run
    scored_images: int  # rows computed by this run
    precision: str | None  # how this run's actors computed: fp32 | bf16 (None: nothing left to score)
    compiled: bool | None


@dataclass(frozen=True)
class Ensemble:
    """The exports that score together: each image decoded once at their common size, probabilities averaged."""

    members: tuple[ExportedModel, ...]
    tuned: tuple[tuple[float, ...], ...]  # each --model's tuned thresholds (a fold ensemble's: out-of-fold)

    @property
    def tags(self) -> tuple[str, ...]:
        return self.members[0].tags

    @property
    def size(self) -> int:
        return self.members[0].size

    @property
    def thresholds(self) -> np.ndarray:
        """Each --model's tuned per-class thresholds, averaged."""
        return np.mean(self.tuned, axis=0)

    def __str__(self) -> str:
        names = {f"{m.arch}@{m.size}" for m in self.members}
        return ", ".join(sorted(names)) + (f" x{len(self.members)}" if len(self.members) > 1 else "")


def load_ensemble(paths: Sequence[str]) -> Ensemble:
    """One export or several that agree on tags and input size (one line naming the odd one out); a fold
    ensemble export counts as its members, with its out-of-fold thresholds."""
    loaded = [load_model(p) for p in paths]
    members = tuple(m for x in loaded for m in (x.members if isinstance(x, EnsembleExport) else (x,)))
    paths = [p for p, x in zip(paths, loaded) for _ in (x.members if isinstance(x, EnsembleExport) else (x,))]
    for path, m in zip(paths[1:], members[1:]):
        if m.tags != members[0].tags:
            raise ScoreError(f"--model {path} predicts other tags than --model {paths[0]}: an ensemble averages "
                             "the same tags")
        if m.size != members[0].size:
            raise ScoreError(f"--model {path} takes {m.size}px images, --model {paths[0]} {members[0].size}px: an "
                             "ensemble decodes each image once, at one size")
    return Ensemble(members, tuple(x.thresholds for x in loaded))


def fingerprint(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()[:16]


class Predictor:
    """A Ray Data actor: the models are built once per actor, then score batch after batch.

    The weights come as object-store references inside a list, which Ray does not resolve into the
    constructor call: the constructor's own arguments stay small, so Ray can restart a lost actor from
    them (it warns about, and cannot always restart, actors whose arguments live in the object store),
    and the actor fetches the weights itself, from whichever node holds them.
    """

    def __init__(self, ensemble: Ensemble, state_refs: list, threads: int, tta: bool, precision: str = "fp32",
                 compile: bool = False, batch_size: int = 64):
        import ray
        import torch

        setup_logging()
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision, self.device)  # on this actor's own hardware
        self.models = [(m, m.build_from_state(ray.get(ref), self.device))
                       for m, ref in zip(ensemble.members, state_refs)]
        self.batch_size, self.compiled = batch_size, False
        if compile:  # compiled now, on the one batch shape it will see (short batches are padded to it)
            example = torch.zeros(batch_size, 3, ensemble.size, ensemble.size, device=self.device)
            example = example.to(memory_format=torch.channels_last)
            def warm_up(model):
                with inference(self.device, self.precision):
                    model(example)

            self.models = [(m, compile_or_eager(model, warm_up)) for m, model in self.models]
            self.compiled = all(isinstance(model, torch._dynamo.eval_frame.OptimizedModule) for _, model in self.models)
        self.tags, self.views, self.batches = ensemble.tags, range(8) if tta else range(1), 0
        log.info("predictor: %s, %s, %s", self.device, self.precision, "compiled" if self.compiled else "eager")

    def __call__(self, batch: dict) -> dict:
        import torch

        maybe_inject_fault(f"score:batch:{self.batches}")
        self.batches += 1
        ok = batch["ok"]
        probs = np.zeros((len(ok), len(self.tags)), dtype=np.float32)
        if ok.any():
            images = batch["image"][ok]
            n = len(images)
            if self.compiled and n < self.batch_size:  # one shape, no recompiling for the last batch
                images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)])
            with inference(self.device, self.precision):
                total = 0
                for k in self.views:  # TTA: the same 8 dihedral views that training augments with
                    view = np.ascontiguousarray(dihedral(images, k))
                    for export, model in self.models:  # each member normalises the one decoded view its own way
                        x = to_model_input(view, self.device, export.normalization)
                        total = total + torch.sigmoid(model(x).float())
            probs[ok] = (total / (len(self.views) * len(self.models)))[:n].cpu().numpy()
        return {ID_COLUMN: batch["path"], "image_name": batch["name"], **dict(zip(self.tags, probs.T)), "ok": ok,
                "error": batch["error"]}


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
    files = folder.files(".jpg")
    if not files:
        raise LayoutError(f"no .jpg images in {folder}")
    return Inputs(submission_order([p.stem for p in files]), files, [folder])


def predictor_memory(states: list[dict]) -> int:
    """Bytes of RAM a predictor actor asks Ray for, so actors go where they fit.

    Measured: a resnet34@128 actor (batch 64) holds 710-740 MiB (Ray Data's memory detector, which warns
    on the console every 30 s while an actor asks for nothing); 1 GiB, plus the weights of each further
    ensemble member, twice (the object-store copy and the model's).
    """
    return (1 << 30) + sum(2 * sum(t.nbytes for t in state.values()) for state in states[1:])


def default_actors(resources: dict, gpus_per_actor: float) -> int:
    """One actor per GPU; on CPUs one single-threaded actor per core.

    Measured on 2 cores (resnet34@128): two 1-thread actors keep the model at ~97% of its
    pure forward rate, one 2-thread actor at ~85%, because every stall of one thread (Ray's
    own processes, decode tasks, result transfers) holds up the other at each op's barrier.
    """
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    return max(1, int(resources.get("CPU", 1)))


def check_output(cfg: ScoreConfig) -> Location:
    """Where the submission goes, refused before any work when it exists (without --overwrite) or cannot be written."""
    out = locate(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ScoreError(f"{out} exists; pass --overwrite to replace it")
    out.parent.check_writable_folder()
    return out


def open_work_folder(cfg: ScoreConfig, out: Location, ensemble: Ensemble, weights: list[bytes],
                     inputs: Inputs) -> WorkFolder:
    """The shards' folder (--work-dir, default next to the submission), refusing rows of another setup.

    Thresholds are applied at assembly, so they may change between runs; the weights, size, TTA and
    inputs may not.
    """
    run = {"models": sorted(fingerprint(w) for w in weights), "size": ensemble.size, "tta": cfg.tta,
           "precision": actor_mode(cfg, 0).precision, "tags": list(ensemble.tags),
           "inputs": sorted(str(f) for f in inputs.folders)}
    try:
        return WorkFolder.open(cfg.work_dir or out.with_name(out.name + ".parts"), run, cfg.overwrite)
    except StorageError as e:  # (a WorkFolderError says which folder itself)
        raise ScoreError(f"work folder: {e}") from None


# torch.compile pays back its compile time once an actor scores this many images. Measured on the 2-core EPYC,
# one thread per actor, batch 64 @128: compiled bf16 saves 1.06 ms an image on resnet34 (87.4 -> 96.3 img/s) and
# 0.23 ms on resnet18 (168.9 -> 175.7); compiling costs 8-12 s alone (24 s the first time in a process) but 29-34 s
# of wall time in the pipeline, where both actors compile at once on the cores that also decode (8,000 images, two
# runs: 123.3 and 127.1 img/s eager vs 88.6 and 82.3 compiled). So on this CPU compiling pays after ~30k images per
# actor for resnet34 and hardly ever for resnet18; 50k keeps auto eager for the Kaggle test set on a multi-core CPU
# and compiles for one GPU actor scoring it all (61,191 images), where the gain is not measured here (no GPU).
COMPILE_MIN_IMAGES = 50_000


@dataclass(frozen=True)
class Mode:
    """How the predictor actors run the model: what --precision and --compile resolved to."""

    precision: str  # fp32 | bf16 ("auto" when GPU actors resolve it on their own GPUs)
    compile: bool


def actor_mode(cfg: ScoreConfig, images_per_actor: float) -> Mode:
    import torch

    gpu = cfg.gpus_per_actor > 0
    if gpu and cfg.precision == "auto" and not torch.cuda.is_available():
        precision = "auto"  # the driver has no GPU to ask; each actor asks its own (and logs the answer)
    else:
        precision = resolve_precision(cfg.precision, torch.device("cuda" if gpu else "cpu"))
    return Mode(precision, cfg.compile == "on" or (cfg.compile == "auto" and images_per_actor >= COMPILE_MIN_IMAGES))


def scoring_pipeline(cfg: ScoreConfig, ensemble: Ensemble, states: list[dict], sources: list[Location],
                     placement: dict | None, n_images: int, where: str):
    """files (folders, or the files still to score) -> read+decode tasks (on the data's node when only it has
    the files) -> predictor actors. Returns the dataset and the actors' mode."""
    import ray

    actors = cfg.actors or default_actors(ray.cluster_resources(), cfg.gpus_per_actor)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // actors)
    mode = actor_mode(cfg, n_images / actors)
    log.info("scoring %d images from %s with %s on %d actor(s), %d torch threads each, %s%s%s", n_images, where,
             ensemble, actors, threads, mode.precision, ", compiled" if mode.compile else "",
             ", TTA x8" if cfg.tta else "")
    # Whole read blocks (batch_size=None) let Ray Data fuse reading and decoding into one task,
    # so raw bytes never pass through the object store and no extra worker process starts;
    # the fused task inherits the read's placement.
    ds = ray.data.read_binary_files([f.path for f in sources], filesystem=sources[0].fs, include_paths=True,
                                    file_extensions=["jpg"], label_selector=placement)
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": ensemble.size, "keep_bad": True},
                        batch_size=None, batch_format="numpy")
    return mode, ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"ensemble": ensemble, "state_refs": [ray.put(s) for s in states], "threads": threads,
                               "tta": cfg.tta, "precision": mode.precision, "compile": mode.compile,
                               "batch_size": cfg.batch_size},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        memory=predictor_memory(states),
        # A dead actor is restarted and its batch retried (Ray Data's defaults, without a count: the
        # per-call max_restarts/max_task_retries are deprecated); a batch that keeps killing its actor
        # stops delivering, and the stall timeout fails the job.
    )


class ShardProgress:
    """While the shards are written: a progress line from the committed shards (what a rerun keeps),
    and the stall limit.

    Ray Data does not fail when its work cannot be placed: after a node is lost, the restarted actors
    can hold every CPU the read tasks need and the job would wait forever. With no new shard for
    `stall_timeout_s`, this interrupts the main thread inside Ray Data's write, which shuts its execution
    down as it does for Ctrl-C, and `stalled` says why. Off the main thread there is no limit.
    """

    POLL_S = 2.0

    def __init__(self, work: WorkFolder, total: int, resumed: int, stall_timeout_s: float):
        self.work, self.stall_timeout_s = work, stall_timeout_s
        self.line = ProgressLine("images scored", total, done=resumed)
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shard-progress", daemon=True)
        self._limit = bool(stall_timeout_s) and threading.current_thread() is threading.main_thread()

    def _watch(self) -> None:
        last_change = time.monotonic()
        while not self._stop.wait(self.POLL_S):
            try:
                done = self.work.committed_rows()
            except StorageError as e:
                log.debug("progress: %s", e)
                continue
            if done > self.line.done:
                self.line.update(done - self.line.done)
                last_change = time.monotonic()
            elif self._limit and time.monotonic() - last_change > self.stall_timeout_s and not self._stop.is_set():
                self.stalled = str(self.line)
                # A real SIGINT to the main thread, as Ctrl-C: it also ends a blocking wait there
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def __enter__(self) -> ShardProgress:
        self._sigint = signal.getsignal(signal.SIGINT)
        if self._limit and self._sigint in (signal.SIG_IGN, signal.SIG_DFL):
            # A job started with SIGINT ignored (`nohup`, `cmd &` in a script) would never see the watcher's
            # signal and hang at a stall: Python's own handler for the write, as an interactive run has.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._limit:
            signal.signal(signal.SIGINT, self._sigint)


def write_shards(ds, work: WorkFolder, cfg: ScoreConfig, placement: dict | None, total: int, resumed: int) -> None:
    """Run the pipeline into Parquet shards with Ray Data's two-phase-commit checkpointing (see shards.py).

    A local work folder on a cluster whose nodes do not share it gets its writes pinned to the driver's
    node, like the reads of local data.
    """
    ds.context.checkpoint_config = work.checkpoint_config()
    ray_remote_args = {"label_selector": placement} if placement else {}
    watch = ShardProgress(work, total, resumed, cfg.stall_timeout_s)
    try:
        with watch:
            ds.write_parquet(work.shards.path, filesystem=work.shards.fs, min_rows_per_file=cfg.shard_rows,
                             ray_remote_args=ray_remote_args)
    except KeyboardInterrupt:
        if watch.stalled:
            raise ScoreError(
                f"no new shard in {cfg.stall_timeout_s:g} s ({watch.stalled}): the cluster cannot place the work; a "
                "lost node, or too few CPUs for the actors plus the read tasks; the shards so far are kept, rerun "
                "the same command to resume") from None
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


def run_scoring(cfg: ScoreConfig) -> ScoreSummary:
    """Score the images of `cfg` into a submission: every check first, then Ray writes shards (only for
    images without a row from an earlier run), then the outputs are assembled from the shards."""
    t0 = time.perf_counter()
    ensemble = load_ensemble(cfg.model)
    inputs = expected_images(cfg)
    out = check_output(cfg)
    threshold = ensemble.thresholds if cfg.threshold == "tuned" else float(cfg.threshold)
    weights = [m.weights.read_bytes() for m in ensemble.members]  # read once: fingerprint and state
    work = open_work_folder(cfg, out, ensemble, weights, inputs)
    done = work.recover()
    todo = [f for f in inputs.files if f.path not in done]
    resumed = len(inputs.files) - len(todo)
    if resumed:
        log.info("resuming: %d of %d images already scored in %s; scoring the other %d",
                 resumed, len(inputs.files), work.root, len(todo))
    mode = None
    if todo:
        states = [m.load_state(w) for m, w in zip(ensemble.members, weights)]
        ensure_ray()
        quiet_data_progress()
        placement = read_placement(inputs.folders[0], cfg.data_shared)
        # A fresh run lists the folders in Ray's read tasks; a resumed one names the missing files.
        sources = todo if resumed else inputs.folders
        mode, ds = scoring_pipeline(cfg, ensemble, states, sources, placement, len(todo),
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
