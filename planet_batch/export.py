"""The exported model: weights plus everything scoring needs, like fastai's export/load_learner.

`model.pt` holds tensors only and is loaded with `weights_only=True`, so an export never
unpickles arbitrary objects; `model.json` holds arch, tags, size, normalisation, thresholds,
the resolved training config and the final metrics.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydantic
import torch
from pydantic import AfterValidator

from planet_batch.cluster.storage import Location, StorageError, locate, write_atomic
from planet_batch.config import MAX_SIZE, MIN_SIZE, Float, Str, describe
from planet_batch.data.labels import TAG_INDEX, TAGS
from planet_batch.data.transforms import Normalization
from planet_batch.errors import PlanetBatchError, first_line
from planet_batch.model import build_model

EXPORT_FORMAT = "planet-batch-export"
EXPORT_VERSION = 1
ENSEMBLE_FORMAT = "planet-batch-ensemble"


class ExportError(PlanetBatchError, ValueError):
    pass


Probability = pydantic.confloat(ge=0, le=1)
InputSize = Annotated[int, pydantic.Field(ge=MIN_SIZE, le=MAX_SIZE)]  # as a stage's (config.MIN_SIZE)


def check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """The competition's 17 tags in any order: the order names the model's outputs (`ExportedModel.to_tags`)."""
    missing = [t for t in TAGS if t not in tags]
    unknown = [t for t in tags if t not in TAG_INDEX]
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if missing or unknown or twice:
        problems = [f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown),
                                                                      ("repeated", twice)) if names]
        raise ValueError(f"must be the competition's {len(TAGS)} tags in any order ({'; '.join(problems)})")
    return tags


def check_normalization(norm: Normalization) -> Normalization:
    """Pixels are in [0, 1]: each mean in [0, 1], each std in (0, 1] (a std of 0 gives NaN probabilities)."""
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in norm.mean):
        raise ValueError(f"mean must be 3 numbers in [0, 1], got {list(norm.mean)}")
    if not all(math.isfinite(v) and 0 < v <= 1 for v in norm.std):
        raise ValueError(f"std must be 3 numbers in (0, 1], got {list(norm.std)}")
    return norm


def rounded(thresholds: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(t, 4) for t in thresholds)


@pydantic.dataclasses.dataclass(frozen=True)
class ExportMeta:
    """Everything scoring needs besides the weights: model.json of one model (with its format and version), every
    field checked when it is made and when `load_export` reads it back."""

    arch: Str
    tags: Annotated[tuple[Str, ...], AfterValidator(check_tags)]
    size: InputSize
    normalize: Annotated[Normalization, AfterValidator(check_normalization)]
    threshold: Probability
    thresholds: Annotated[tuple[Probability, ...], AfterValidator(rounded)]  # in the order of `tags`
    dropout: Annotated[Float, pydantic.Field(ge=0, lt=1)] = 0.5
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tracking_run: Str | None = None  # the MLflow run that trained it (planet_batch.tracking)

    def values(self) -> dict:
        """Its fields (an ExportedModel's: without where its weights are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ExportMeta)}

    def as_json(self) -> dict:
        """model.json's content."""
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **self.values()}


@pydantic.dataclasses.dataclass(frozen=True)
class EnsembleMeta:
    """model.json of a fold ensemble: its members' folders relative to the folder that holds it."""

    format: Literal["planet-batch-ensemble"]
    version: Literal[1]
    members: Annotated[tuple[Str, ...], pydantic.Field(min_length=1)]
    threshold: Probability
    thresholds: Annotated[tuple[Probability, ...], AfterValidator(rounded)]  # in the first member's tags' order
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tracking_run: Str | None = None  # the K-fold run's parent MLflow run


@pydantic.dataclasses.dataclass(frozen=True, kw_only=True, config=pydantic.ConfigDict(arbitrary_types_allowed=True))
class ExportedModel(ExportMeta):
    """An export as scoring loads it: its model.json and where its weights are."""

    weights: Location

    @property
    def to_tags(self) -> np.ndarray:
        """Indices that put this model's outputs (and thresholds), in the order of its `tags`, into TAGS order:
        `probs[:, to_tags]`. Everything downstream (decode, probs.parquet, ensembles) works in TAGS order."""
        return np.asarray([self.tags.index(t) for t in TAGS])

    def load_state(self, data: bytes | None = None) -> dict:
        """The weights as tensors (`weights_only`: an export never unpickles objects), from a path or a URI;
        `data`: the weights file's bytes when the caller has read them already."""
        try:
            data = self.weights.read_bytes() if data is None else data
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as e:
            raise ExportError(f"{self.weights}: not a weights file ({first_line(e)})") from None

    def check_state(self, state: dict) -> None:
        """`state` is weights of this arch (a strict load into the model), all finite: checked in the driver
        before any work, so a wrong model.pt is one line instead of a failure inside every actor."""
        from planet_batch.weights import WeightsError

        try:
            self.build_from_state(state)
        except WeightsError as e:
            raise ExportError(f"{self.weights.parent / 'model.json'}: {e}") from None
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, other shapes
            raise ExportError(f"{self.weights}: not weights of {self.arch} ({first_line(e)})") from None
        bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            raise ExportError(f"{self.weights}: {bad} holds NaN or infinite values")

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        return self.build_from_state(self.load_state(), device)

    def build_from_state(self, state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model in eval mode from weights already loaded (scoring actors get them from the object store)."""
        model = build_model(self.arch, len(self.tags), weights="none", dropout=self.dropout)
        model.load_state_dict(state)
        return model.to(device).eval()


def save_export(out_dir: Path | str, model_state: dict, meta: ExportMeta) -> Path:
    """RUN/export (model.pt, model.json) of `meta` (an ExportedModel's own: its model.json's fields alone)."""
    out = Path(out_dir)
    write_atomic(out / "model.pt", lambda p: torch.save(model_state, p))
    _write_meta(out, meta.as_json())
    return out


def _write_meta(out: Path, content: dict) -> None:
    """model.json, atomically (dataclasses inside, as the normalisation, written as objects)."""
    write_atomic(out / "model.json", lambda p: p.write_text(json.dumps(content, indent=2, default=dataclasses.asdict)))


@dataclass(frozen=True)
class EnsembleExport:
    """A fold ensemble (`train --folds K`): member exports that score as one model, their probabilities
    averaged, with thresholds tuned on the out-of-fold predictions of all of them."""

    location: Location
    members: tuple[ExportedModel, ...]
    threshold: float
    thresholds: tuple[float, ...]
    config: dict
    metrics: dict
    tracking_run: str | None = None


def save_ensemble(out_dir: Path | str, members: list[str], *, threshold: float, thresholds: np.ndarray, config: dict,
                  metrics: dict, tracking_run: str | None = None) -> Path:
    """`members`: the member exports' folders relative to the folder that holds `out_dir` (RUN/), so a run
    folder can be moved or copied to a bucket whole. No weights of its own: the members' are the model."""
    out = Path(out_dir)
    meta = EnsembleMeta(ENSEMBLE_FORMAT, EXPORT_VERSION, tuple(members), threshold, tuple(thresholds), config,
                        metrics, tracking_run)
    _write_meta(out, dataclasses.asdict(meta))
    return out


def _read_meta(path: Location) -> tuple[Location, dict]:
    meta_path = path / "model.json"
    try:
        if not meta_path.is_file():
            raise ExportError(f"{path} is not a model export: model.json is missing (train writes RUN_DIR/export/)")
        meta = json.loads(meta_path.read_bytes())
    except StorageError as e:
        raise ExportError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{meta_path}: not a JSON object")
    return meta_path, meta


def odd_member(members: Sequence[ExportedModel]) -> int | None:
    """The first member that takes another input size than the first, if any: an ensemble decodes each image
    once, at one size. (Tags may come in any order: each member's outputs are put in TAGS order.)"""
    return next((i for i, m in enumerate(members) if m.size != members[0].size), None)


def load_model(path: Path | str | Location) -> ExportedModel | EnsembleExport:
    """An export folder of either kind: one model, or a fold ensemble whose members load and agree on tags and
    input size (each problem one line naming the member)."""
    try:
        path = locate(path)
    except StorageError as e:
        raise ExportError(str(e)) from None
    meta_path, meta = _read_meta(path)
    if meta.get("format") != ENSEMBLE_FORMAT:
        return load_export(path)
    ensemble = _validate(EnsembleMeta, meta, meta_path)
    names, members = ensemble.members, []
    for name in names:
        try:
            members.append(load_export(path.parent / name))
        except ExportError as e:
            raise ExportError(f"ensemble export {path}: member {name}: {e}") from None
    if (i := odd_member(members)) is not None:
        m = members[i]
        raise ExportError(f"ensemble export {path}: member {names[i]} takes {m.size}px images, {names[0]} "
                          f"{members[0].size}px")
    if len(ensemble.thresholds) != len(members[0].tags):
        raise ExportError(f"{meta_path}: {len(ensemble.thresholds)} thresholds for {len(members[0].tags)} tags")
    return EnsembleExport(path, tuple(members), ensemble.threshold, ensemble.thresholds, ensemble.config,
                          ensemble.metrics, ensemble.tracking_run)


def _validate(cls, meta: dict, meta_path: Location):
    """`meta` as `cls`, or one line naming the field that does not fit."""
    try:
        return cls(**meta)
    except pydantic.ValidationError as e:
        raise ExportError(f"{meta_path}: {describe(e, cls)}") from None


def load_export(path: Path | str | Location) -> ExportedModel:
    """Read an export folder (a path or a URI), failing with a clear message when it is missing or incompatible."""
    try:
        path = locate(path)
    except StorageError as e:
        raise ExportError(str(e)) from None
    meta_path, meta = _read_meta(path)
    weights = path / "model.pt"
    if meta.get("format") == ENSEMBLE_FORMAT:
        raise ExportError(f"{path} is a fold ensemble export: `planet-batch score --model {path}` scores it")
    try:
        if not weights.is_file():
            raise ExportError(f"{path} is not a model export: model.pt is missing (train writes RUN_DIR/export/)")
    except StorageError as e:
        raise ExportError(str(e)) from None
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
        raise ExportError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not supported "
            f"(this planet-batch reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}); re-export with this version"
        )
    m = _validate(ExportMeta, meta, meta_path)
    if len(m.thresholds) != len(m.tags):
        raise ExportError(f"{meta_path}: {len(m.thresholds)} thresholds for {len(m.tags)} tags")
    return ExportedModel(**m.values(), weights=weights)
