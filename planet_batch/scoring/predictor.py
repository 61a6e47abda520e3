"""The model side of scoring: the exports that score together, the predictor actor that runs them, and how
it runs them (precision, torch.compile, memory)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planet_batch.cluster.runtime import maybe_inject_fault, setup_logging
from planet_batch.config import ScoreConfig
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import dihedral
from planet_batch.export import EnsembleExport, ExportedModel, load_model, odd_member
from planet_batch.model import compile_or_eager, inference, is_compiled, logits, resolve_precision
from planet_batch.scoring import ScoreError
from planet_batch.scoring.shards import ID_COLUMN

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
        import ray
        import torch

        setup_logging()
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision, self.device)  # on this actor's own hardware
        self.models = [(m, m.build_from_state(ray.get(ref), self.device))
                       for m, ref in zip(ensemble.members, state_refs)]
        # each member's outputs into TAGS order, the order of every column downstream
        self.orders = [torch.as_tensor(m.to_tags, device=self.device) for m in ensemble.members]
        self.batch_size, self.compiled = batch_size, False
        if compile:  # compiled now, on the one batch shape it will see (short batches are padded to it)
            example = torch.zeros(batch_size, 3, ensemble.size, ensemble.size, device=self.device)
            example = example.to(memory_format=torch.channels_last)
            def warm_up(model):
                with inference(self.device, self.precision):
                    model(example)

            self.models = [(m, compile_or_eager(model, warm_up)) for m, model in self.models]
            self.compiled = all(is_compiled(model) for _, model in self.models)
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
                    for (export, model), order in zip(self.models, self.orders):
                        out = logits(model, view, self.device, export.normalize)  # each member its own way
                        total = total + torch.sigmoid(out)[:, order]
            probs[ok] = (total / (len(self.views) * len(self.models)))[:n].cpu().numpy()
        return {ID_COLUMN: batch["path"], "image_name": batch["name"], **dict(zip(self.tags, probs.T)), "ok": ok,
                "error": batch["error"]}


def predictor_memory(states: list[dict]) -> int:
    """Bytes of RAM a predictor actor asks Ray for, so actors go where they fit.

    Measured: a resnet34@128 actor (batch 64) holds 710-740 MiB (Ray Data's memory detector, which warns
    on the console every 30 s while an actor asks for nothing); 1 GiB, plus the weights of each further
    ensemble member, twice (the object-store copy and the model's).
    """
    return (1 << 30) + sum(2 * sum(t.nbytes for t in state.values()) for state in states[1:])


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
