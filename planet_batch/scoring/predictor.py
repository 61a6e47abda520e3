"""The model side of scoring: the exports that score together, the predictor actor that runs them, and how
it runs them (precision, torch.compile, memory)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planet_batch.cluster.runtime import maybe_inject_fault, setup_logging
from planet_batch.config import ScoreConfig
from planet_batch.data.labels import TAGS
from planet_batch.export import EnsembleExport, ExportedModel, load_model, odd_member
from planet_batch.model import TTA_VIEWS, compile_or_eager, inference, is_compiled, mean_probs, resolve_precision
from planet_batch.scoring import ID_COLUMN, ScoreError

log = logging.getLogger("planet_batch.scoring.score")  # the scoring's console lines under one name


@dataclass(frozen=True)
class Ensemble:
    """The exports that score together: each image decoded once at their common size, probabilities averaged."""

    members: tuple[ExportedModel, ...]
    tuned: tuple[tuple[float, ...], ...]  # each --model's tuned thresholds in TAGS order (a fold ensemble's: OOF)
    runs: tuple[str | None, ...] = ()  # each --model's MLflow training run (a fold ensemble's: the parent)

    @property
    def tags(self) -> tuple[str, ...]:
        """The order of every probability the ensemble gives (each member's outputs are put in it)."""
        return TAGS

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
    if (i := odd_member(members)) is not None:
        raise ScoreError(f"--model {paths[i]} takes {members[i].size}px images, --model {paths[0]} "
                         f"{members[0].size}px: an ensemble decodes each image once, at one size")
    # Each --model's thresholds follow its tags (a fold ensemble's, its first member's): into TAGS order
    tuned = tuple(tuple(np.asarray(x.thresholds)[(x.members[0] if isinstance(x, EnsembleExport) else x).to_tags])
                  for x in loaded)
    return Ensemble(members, tuned, tuple(x.tracking_run for x in loaded))


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
        import torch

        setup_logging()
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision, self.device)  # on this actor's own hardware
        self.models = [(m, m.build_from_state(fetched(ref), self.device))
                       for m, ref in zip(ensemble.members, state_refs)]
        if self.device.type == "cuda":  # the layout of to_model_input's batches: no conversion per layer
            self.models = [(m, model.to(memory_format=torch.channels_last)) for m, model in self.models]
        # each member's outputs into TAGS order, the order of every column downstream
        self.orders = [torch.as_tensor(m.to_tags, device=self.device) for m in ensemble.members]
        self.batch_size, self.compiled = batch_size, False
        # A GPU's batches go up from one pinned buffer, without waiting: a pageable copy would block the host.
        self.pinned = torch.empty((batch_size, ensemble.size, ensemble.size, 3), dtype=torch.uint8).pin_memory() \
            if self.device.type == "cuda" else None
        if compile:  # compiled now, on the one batch shape it will see (short batches are padded to it)
            example = torch.zeros(batch_size, 3, ensemble.size, ensemble.size, device=self.device)
            example = example.to(memory_format=torch.channels_last)
            def warm_up(model):
                with inference(self.device, self.precision):
                    model(example)

            self.models = [(m, compile_or_eager(model, warm_up)) for m, model in self.models]
            self.compiled = all(is_compiled(model) for _, model in self.models)
        self.tags, self.views, self.batches = ensemble.tags, TTA_VIEWS if tta else range(1), 0
        log.info("predictor: %s, %s, %s", self.device, self.precision, "compiled" if self.compiled else "eager")

    def upload(self, images: np.ndarray):
        """uint8 NHWC images on the actor's device: one copy (through the pinned buffer, not waited for, on a GPU)."""
        import torch

        with warnings.catch_warnings():  # a batch that is one whole block arrives read-only (zero copy from the
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # object store); it is only read
            x = torch.from_numpy(images)
        if self.pinned is None:
            return x
        staged = self.pinned[:len(x)]
        staged.copy_(x)
        return staged.to(self.device, non_blocking=True)

    def __call__(self, batch: dict) -> dict:
        import torch

        maybe_inject_fault(f"score:batch:{self.batches}")
        self.batches += 1
        ok = batch["ok"]
        probs = np.zeros((len(ok), len(self.tags)), dtype=np.float32)
        if ok.any():
            x = self.upload(batch["image"] if ok.all() else batch["image"][ok])
            n = len(x)
            if self.compiled and n < self.batch_size:  # one shape, no recompiling for the last batch
                x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            # TTA's views turned on the device; each member normalised its own way
            with inference(self.device, self.precision):
                total = sum(mean_probs(model, x, self.device, export.normalize, self.views)[:, order]
                            for (export, model), order in zip(self.models, self.orders))
            probs[ok] = (total / len(self.models))[:n].cpu().numpy()  # the batch's one wait
        return {ID_COLUMN: batch["path"], "image_name": batch["name"], **dict(zip(self.tags, probs.T)), "ok": ok,
                "error": batch["error"]}


def fetched(state) -> dict:
    """A member's weights: from the object store (a reference, in a Ray Data actor) or as given (bench/gpu_check.py
    runs the actor without Ray)."""
    if isinstance(state, dict):
        return state
    import ray

    return ray.get(state)


def predictor_memory(states: list[dict]) -> int:
    """Bytes of RAM a predictor actor asks Ray for, so actors go where they fit.

    Measured: a resnet34@128 actor (batch 64) holds 710-740 MiB (Ray Data's memory detector, which warns
    on the console every 30 s while an actor asks for nothing); 1 GiB, plus the weights of each further
    ensemble member, twice (the object-store copy and the model's).
    """
    return (1 << 30) + sum(2 * sum(t.nbytes for t in state.values()) for state in states[1:])


@dataclass(frozen=True)
class CompilePayback:
    """What torch.compile costs a scoring actor once, and what it saves on every image after."""

    seconds: float  # the compile, as the pipeline sees it (wall time, other work beside it)
    saved_per_image_s: float

    def pays(self, images: float) -> bool:
        return images * self.saved_per_image_s > self.seconds


# Per device kind. CPU, measured on the 2-core EPYC, one thread per actor, batch 64 @128: compiled bf16 saves 1.06 ms
# an image on resnet34 (87.4 -> 96.3 img/s; resnet18 0.23 ms, 168.9 -> 175.7); compiling costs 8-12 s alone but 29-34 s
# of wall time in the pipeline, where both actors compile at once on the cores that also decode (8,000 images, two
# runs: 123.3 and 127.1 img/s eager vs 88.6 and 82.3 compiled): it pays after ~28k images an actor. GPU, not measured
# here (no GPU lent yet; bench/gpu_check.py measures it): a cold Inductor compile of resnet34 takes tens of seconds
# (60 s assumed), and the model alone scores about 12,000 chips/s at 256 px in bf16 on an H100 (timm's published
# rates), 83 us an image, of which compiling saves at most a quarter: ~20 us. It pays after ~3 million images an actor,
# so the 61,191 Kaggle images stay eager on a GPU.
COMPILE_PAYBACK = {"cpu": CompilePayback(30.0, 1.06e-3), "cuda": CompilePayback(60.0, 20e-6)}
# Images per predictor call when --batch-size is 0: a GPU needs larger batches to stay busy.
DEFAULT_BATCH = {"cpu": 64, "cuda": 256}


def actor_gpus(requested: str, resources: dict | None) -> float | None:
    """GPUs per predictor actor: the number asked for; auto, 1 where the cluster has GPUs, else 0 (None while the
    cluster's `resources` are not known: before Ray starts)."""
    if requested != "auto":
        return float(requested)
    if resources is None:
        return None
    return 1.0 if resources.get("GPU", 0.0) > 0 else 0.0


@dataclass(frozen=True)
class Mode:
    """How the predictor actors run: what --gpus-per-actor, --batch-size, --precision and --compile resolved to."""

    gpus: float  # per actor
    batch_size: int
    precision: str  # fp32 | bf16 ("auto" when GPU actors resolve it on their own GPUs)
    compile: bool


def actor_mode(cfg: ScoreConfig, gpus: float | None, images_per_actor: float) -> Mode:
    """The actors' mode on `gpus` GPUs each (None: not known before Ray starts, with --gpus-per-actor auto)."""
    import torch

    kind = "cuda" if gpus else "cpu"
    if cfg.precision == "auto" and (gpus is None or (gpus > 0 and not torch.cuda.is_available())):
        precision = "auto"  # the driver cannot tell: each actor resolves it on its own hardware (and logs it)
    else:
        precision = resolve_precision(cfg.precision, torch.device(kind))
    compile = cfg.compile == "on" or (cfg.compile == "auto" and COMPILE_PAYBACK[kind].pays(images_per_actor))
    return Mode(gpus or 0.0, cfg.batch_size or DEFAULT_BATCH[kind], precision, compile)
