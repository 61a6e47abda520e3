"""Typed job configs: dataclasses loaded from YAML, overridden from the CLI, validated up front.

Every field error names the field (`stages[1].lr: ...`) so a bad config fails before Ray starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from planet_batch.errors import PlanetBatchError

T = TypeVar("T")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
TIMM_PREFIX = "timm/"  # arch: timm/NAME, any timm model as the body (the name is checked against timm's registry)
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "on", "off")


class Switch(str):
    """A str field whose values include on/off: YAML reads a bare `on` / `off` (and yes/no, true/false) as a
    boolean, which such a field takes back as "on" / "off"."""


class ConfigError(PlanetBatchError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `fit_one_cycle` call of the notebook."""

    name: str
    size: int
    epochs: int
    frozen: bool
    lr: float | tuple[float, float]
    # An earlier stage of this config, or a saved stage file (.pt) from another run.
    # None: continue from the previous stage (the first stage starts from `weights`).
    start_from: str | None = None

    @property
    def start_file(self) -> str | None:
        """`start_from` when it is a saved stage file (.pt), not a stage of this config."""
        return self.start_from if self.start_from and self.start_from.endswith(".pt") else None

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if not self.name or "/" in self.name:
            raise ConfigError(f"{where}: name must be non-empty without '/'")
        if self.size <= 0:
            raise ConfigError(f"{where}: size must be positive, got {self.size}")
        if self.epochs <= 0:
            raise ConfigError(f"{where}: epochs must be positive, got {self.epochs}")
        lrs = self.lr if isinstance(self.lr, tuple) else (self.lr,)
        if not all(1e-8 <= v <= 1.0 for v in lrs):
            raise ConfigError(f"{where}: lr must be in [1e-8, 1], got {self.lr}")
        if isinstance(self.lr, tuple) and self.lr[0] > self.lr[1]:
            raise ConfigError(f"{where}: lr [lo, hi] needs lo <= hi, got {list(self.lr)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stages: tuple[Stage, ...]
    arch: str = "resnet34"
    # imagenet (torchvision's or timm's pretrained weights, from their caches) | none | a state dict file
    # (.pt/.pth/.safetensors) in the architecture's own layout
    weights: str = "none"
    batch_size: int = 64
    valid_pct: float = 0.2
    seed: int = 42
    threshold: float = 0.2
    weight_decay: float = 1e-2
    dropout: float = 0.5
    workers: int = 2  # 0: Ray Train local mode, everything in the driver
    cpus_per_worker: float = 1.0
    gpu: bool = False
    # auto | fp32 | bf16: bf16 autocast for the forward passes where the hardware has native bf16
    precision: str = "auto"
    # auto | on | off: torch.compile the training model; auto compiles only where it pays (train.compile_training)
    compile: Switch = "auto"
    torch_threads: int = 0  # 0: the worker's CPU share, at least 1
    max_failures: int = 3
    storage: str | None = None  # Ray Train storage (local path, NFS, s3://); default RUN_DIR/ray
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    # The cluster adds nodes on demand (cluster.yaml's GPU workers start at 0): skip the up-front
    # capacity check and let Ray Train wait for the autoscaler instead of failing.
    autoscale: bool = False
    # A local data root that every node mounts (NFS): read it on every node, not only the driver's.
    data_shared: bool = False
    # K-fold training (planet_batch.folds): 0 trains one model on a valid_pct split; K >= 2 trains K folds,
    # `parallel_folds` at a time (0: as many as the cluster holds).
    folds: int = 0
    parallel_folds: int = 0
    # A run folder holds one run: the same config resumes it where it stopped, another is refused;
    # `overwrite` starts over (for K folds: every fold).
    overwrite: bool = False

    def __post_init__(self):
        if self.arch not in TORCHVISION_ARCHS and not (self.arch.startswith(TIMM_PREFIX) and self.arch != TIMM_PREFIX):
            raise ConfigError(f"arch: unknown {self.arch!r}, choose one of {', '.join(TORCHVISION_ARCHS)} or "
                              f"{TIMM_PREFIX}NAME (a timm model)")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ConfigError(f"stages[{i}].name: duplicate stage name {st.name!r}")
            if st.start_from is not None and st.start_file is None and st.start_from not in seen:
                raise ConfigError(
                    f"stages[{i}].start_from: {st.start_from!r} is not an earlier stage "
                    f"(earlier: {seen or 'none'}) nor a saved stage file (.pt)"
                )
            seen.append(st.name)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("compile", self.compile, COMPILES)
        _check_range("batch_size", self.batch_size, 1, 65536)
        _check_range("valid_pct", self.valid_pct, 0.0, 1.0, open_ends=True)
        _check_range("threshold", self.threshold, 0.0, 1.0, open_ends=True)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("dropout", self.dropout, 0.0, 1.0, open_ends=True, lo_closed=True)
        _check_range("workers", self.workers, 0, 4096)
        _check_range("cpus_per_worker", self.cpus_per_worker, 0.0, 1024, open_ends=True)
        _check_range("torch_threads", self.torch_threads, 0, 1024)
        _check_range("max_failures", self.max_failures, -1, 1000)
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds: {self.folds} folds; K-fold needs at least 2 (0 trains one model)")
        _check_range("folds", self.folds, 0, 1000)
        _check_range("parallel_folds", self.parallel_folds, 0, 1000)
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"placement_strategy: unknown {self.placement_strategy!r}")


# Settings that change how a run is carried out, not the model it trains: a rerun on the same run folder (or of a
# K-fold run's finished folds) may change them.
HOW_NOT_WHAT = ("parallel_folds", "max_failures", "storage", "autoscale", "placement_strategy", "data_shared",
                "overwrite")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _check_range(name, value, lo, hi, open_ends=False, lo_closed=False):
    ok = (lo <= value if (not open_ends or lo_closed) else lo < value) and (value < hi if open_ends else value <= hi)
    if not ok:
        raise ConfigError(f"{name}: {value!r} is out of range {'(' if open_ends and not lo_closed else '['}{lo}, {hi}"
                          f"{')' if open_ends else ']'}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every field's type and name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _coerce(tp, value, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in args:
            try:
                return _coerce(alt, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not fit {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, str):
            value = [value]  # `model: path` for a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str or tp is Switch:
        if isinstance(value, str):
            return value
        if tp is Switch and isinstance(value, bool):
            return "on" if value else "off"
    else:
        raise TypeError(f"{path}: unsupported config type {tp}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg) -> dict:
    """Plain data (lists, not tuples) that `from_dict` reads back to an equal config."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`key.sub=value` / `stages.0.epochs=2` overrides; values are parsed as YAML."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node: Any = data
        for p in parents:
            try:
                node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            except (IndexError, ValueError):
                raise ConfigError(f"override {item!r}: no {p!r} in {key!r}") from None
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            try:
                node[int(leaf)] = value
            except (IndexError, ValueError):
                raise ConfigError(f"override {item!r}: no {leaf!r} in {key!r}") from None
        else:
            node[leaf] = value
    return data


def load_config(cls: type[T], path: Path | str | None, overrides: Sequence[str] = (),
                values: dict[str, Any] | None = None) -> T:
    """The YAML file at `path`, then `KEY=VALUE` overrides (parsed as YAML), then typed `values` (CLI flags)."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        return from_dict(cls, {**apply_overrides(data, overrides), **(values or {})})
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def save_config(cfg, path: Path | str) -> Path:
    from planet_batch.storage import write_atomic

    path = Path(path)
    write_atomic(path, lambda p: p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    return path


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    model: tuple[str, ...]  # export folders (RUN_DIR/export); several are scored as one ensemble
    out: str = "submission.csv"
    work_dir: str | None = None  # the Parquet shards of a run, kept until it succeeds; default OUT.parts next to out
    keep_parts: bool = False  # keep the work folder after success
    # Rows per shard file (Ray Data's min_rows_per_file): what an interruption can lose per write task in
    # flight, against files per run (61,191 images: 62 shards)
    shard_rows: int = 1000
    data: str | None = None  # a Kaggle data root: test-jpg + test-jpg-additional, sample submission order
    images: str | None = None  # or any folder of .jpg files
    threshold: str = "0.2"  # a number, or "tuned" for the export's per-class thresholds
    tta: bool = False  # average the 8 dihedral views
    batch_size: int = 64
    actors: int = 0  # 0: one per GPU with gpus_per_actor, else one per CPU of the cluster
    # Logical CPUs (threads are torch_threads): with one actor per CPU, 0.25 leaves the read/decode tasks
    # 3/4 of the cluster, and still half of it after a lost node's actors restart elsewhere; at 0.5 those
    # restarted actors took every CPU and scoring stalled (tests/test_cluster.py). Same speed on 2 cores.
    cpus_per_actor: float = 0.25
    gpus_per_actor: float = 0.0
    torch_threads: int = 0  # 0: the node's cores shared among the actors
    probs_out: str | None = None  # Parquet of every probability
    data_shared: bool = False  # a local --data / --images path that every node mounts: read it everywhere
    strict: bool = False  # unreadable images fail the job instead of getting an empty tag set
    overwrite: bool = False
    precision: str = "auto"  # auto | fp32 | bf16: auto is bf16 on hardware with native bf16 (model.resolve_precision)
    compile: Switch = "auto"  # auto | on | off: auto compiles when each actor has enough images to pay it back
    # No new shard for this long fails the job (0: wait forever). A cluster that lost a node can
    # otherwise wait without end: its restarted actors may take the CPUs the read tasks need.
    stall_timeout_s: float = 600.0

    def __post_init__(self):
        if isinstance(self.model, str):
            object.__setattr__(self, "model", (self.model,))
        if not self.model:
            raise ConfigError("model: give at least one --model (an export folder)")
        if (self.data is None) == (self.images is None):
            raise ConfigError("data / images: give exactly one of --data (Kaggle layout) or --images (a folder)")
        if self.threshold != "tuned":
            try:
                value = float(self.threshold)
            except ValueError:
                raise ConfigError(f"threshold: {self.threshold!r} is neither a number nor 'tuned'") from None
            _check_range("threshold", value, 0.0, 1.0, open_ends=True)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("compile", self.compile, COMPILES)
        _check_range("batch_size", self.batch_size, 1, 65536)
        _check_range("shard_rows", self.shard_rows, 1, 10_000_000)
        _check_range("actors", self.actors, 0, 4096)
        _check_range("cpus_per_actor", self.cpus_per_actor, 0.0, 1024, open_ends=True)
        _check_range("gpus_per_actor", self.gpus_per_actor, 0.0, 64)
        _check_range("torch_threads", self.torch_threads, 0, 1024)
        _check_range("stall_timeout_s", self.stall_timeout_s, 0.0, 7 * 86400)
