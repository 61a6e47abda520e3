"""The exported model: weights plus everything scoring needs, like fastai's export/load_learner.

`model.pt` holds tensors only and is loaded with `weights_only=True`, so an export never
unpickles arbitrary objects; `model.json` holds arch, tags, size, normalisation, thresholds,
the resolved training config and the final metrics.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planet_batch.errors import PlanetBatchError
from planet_batch.model import build_model
from planet_batch.storage import Location, StorageError, locate, write_atomic
from planet_batch.transforms import Normalization

EXPORT_FORMAT = "planet-batch-export"
EXPORT_VERSION = 1
ENSEMBLE_FORMAT = "planet-batch-ensemble"


class ExportError(PlanetBatchError, ValueError):
    pass


@dataclass(frozen=True)
class ExportedModel:
    arch: str
    tags: tuple[str, ...]
    size: int
    normalization: Normalization
    threshold: float
    thresholds: tuple[float, ...]
    dropout: float
    config: dict
    metrics: dict
    weights: Location

    def load_state(self, data: bytes | None = None) -> dict:
        """The weights as tensors (`weights_only`: an export never unpickles objects), from a path or a URI;
        `data`: the weights file's bytes when the caller has read them already."""
        try:
            data = self.weights.read_bytes() if data is None else data
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as e:
            raise ExportError(f"{self.weights}: not a weights file ({str(e).splitlines()[0]})") from None

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        return self.build_from_state(self.load_state(), device)

    def build_from_state(self, state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model in eval mode from weights already loaded (scoring actors get them from the object store)."""
        model = build_model(self.arch, len(self.tags), weights="none", dropout=self.dropout)
        model.load_state_dict(state)
        return model.to(device).eval()


def save_export(
    out_dir: Path | str,
    model_state: dict,
    *,
    arch: str,
    tags: tuple[str, ...],
    size: int,
    normalization: Normalization,
    threshold: float,
    thresholds: np.ndarray,
    dropout: float,
    config: dict,
    metrics: dict,
) -> Path:
    out = Path(out_dir)
    write_atomic(out / "model.pt", lambda p: torch.save(model_state, p))
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "arch": arch,
        "tags": list(tags),
        "size": size,
        "normalize": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "threshold": threshold,
        "thresholds": [round(float(t), 4) for t in thresholds],
        "dropout": dropout,
        "config": config,
        "metrics": metrics,
    }
    write_atomic(out / "model.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


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


def save_ensemble(out_dir: Path | str, members: list[str], *, threshold: float, thresholds: np.ndarray, config: dict,
                  metrics: dict) -> Path:
    """`members`: the member exports' folders relative to the folder that holds `out_dir` (RUN/), so a run
    folder can be moved or copied to a bucket whole. No weights of its own: the members' are the model."""
    out = Path(out_dir)
    meta = {"format": ENSEMBLE_FORMAT, "version": EXPORT_VERSION, "members": members, "threshold": threshold,
            "thresholds": [round(float(t), 4) for t in thresholds], "config": config, "metrics": metrics}
    write_atomic(out / "model.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def _read_meta(path: Location) -> tuple[Location, dict]:
    meta_path = path / "model.json"
    try:
        if not meta_path.is_file():
            raise ExportError(f"{path} is not a model export: model.json is missing (train writes RUN_DIR/export/)")
        return meta_path, json.loads(meta_path.read_bytes())
    except StorageError as e:
        raise ExportError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: not valid JSON ({e})") from None


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
    try:
        names, thresholds = [str(m) for m in meta["members"]], tuple(float(t) for t in meta["thresholds"])
        threshold = float(meta["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{meta_path}: missing or malformed field {e}") from None
    members = []
    for name in names:
        try:
            members.append(load_export(path.parent / name))
        except ExportError as e:
            raise ExportError(f"ensemble export {path}: member {name}: {e}") from None
    for name, m in zip(names[1:], members[1:]):
        if (m.tags, m.size) != (members[0].tags, members[0].size):
            raise ExportError(f"ensemble export {path}: member {name} ({len(m.tags)} tags, {m.size}px) does not "
                              f"match {names[0]} ({len(members[0].tags)} tags, {members[0].size}px)")
    if not members or len(thresholds) != len(members[0].tags):
        raise ExportError(f"{meta_path}: {len(members)} members, {len(thresholds)} thresholds")
    return EnsembleExport(path, tuple(members), threshold, thresholds, meta.get("config", {}), meta.get("metrics", {}))


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
    try:
        tags = tuple(meta["tags"])
        thresholds = tuple(float(t) for t in meta["thresholds"])
        if len(thresholds) != len(tags):
            raise ExportError(f"{meta_path}: {len(thresholds)} thresholds for {len(tags)} tags")
        return ExportedModel(
            arch=meta["arch"],
            tags=tags,
            size=int(meta["size"]),
            normalization=Normalization(tuple(meta["normalize"]["mean"]), tuple(meta["normalize"]["std"])),
            threshold=float(meta["threshold"]),
            thresholds=thresholds,
            dropout=float(meta.get("dropout", 0.5)),
            config=meta.get("config", {}),
            metrics=meta.get("metrics", {}),
            weights=weights,
        )
    except (KeyError, TypeError) as e:
        raise ExportError(f"{meta_path}: missing or malformed field {e}") from None
