"""Typed job configs: pydantic dataclasses loaded from YAML, overridden from the CLI, validated up front.

Each field's description is its `--flag`'s help (cli.add_config_flags), and every field error names the field
(`stages[1].lr: ...`), so a bad config fails before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from planet_batch.errors import PlanetBatchError, first_line

T = TypeVar("T")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
TIMM_PREFIX = "timm/"  # arch: timm/NAME, any timm model as the body (the name is checked against timm's registry)
# Input sizes a body can take (a stage's, and so an export's): below 32 px a ResNet's five halvings leave nothing;
# above 1024 px a batch of 64 is 800 MB of input alone (Planet's chips are 256 px).
MIN_SIZE, MAX_SIZE = 32, 1024

# Strict scalars: a quoted "2" is no int, YAML's `yes` (a bool) no str, a bool no int or float; an int is taken as
# a float, and tuples take YAML's lists.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an int is taken as its float
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
LearningRate = Annotated[float, Strict(), Field(ge=1e-8, le=1.0)]
Precision = Literal["auto", "fp32", "bf16"]


def on_off(value):
    """YAML reads a bare `on` / `off` (and yes/no, true/false) as a boolean: an on/off field takes it back."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# auto | on | off, and YAML's `on` / `off` (which it reads as booleans)
Compile = Annotated[Literal["auto", "on", "off"], BeforeValidator(on_off)]


class ConfigError(PlanetBatchError, ValueError):
    pass


def number_or_word(value: str, word: str, within: Callable[[float], bool], bounds: str) -> str:
    """A text field that holds a number within `bounds` or `word` (`threshold: tuned`, `gpus_per_actor: auto`)."""
    if value != word:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is neither a number nor {word!r}") from None
        if not within(number):
            raise ValueError(f"{value!r} is out of range {bounds}")
    return value


def flag(
    default: Any = dataclasses.MISSING, *, help: str, group: str | None = None, name: str | None = None, **constraints
) -> Any:
    """A config field with its `--flag`: `help` is the field's description, `group` the help section it is
    listed in (None: no flag, set it in the YAML or with --set), `name` a flag other than --field-name."""
    extra = {"group": group} | ({"flag": name} if name else {})
    if default is dataclasses.MISSING:
        return Field(description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def config_model(cls: type[T]) -> type[T]:
    """A frozen pydantic dataclass (unknown fields refused) whose validation errors are one ConfigError
    naming the field, whether it is built from a YAML mapping or called directly."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as e:
            raise ConfigError(describe(e, cls)) from None

    cls.__init__ = __init__
    return cls


def describe(error: pydantic.ValidationError, cls: type) -> str:
    """The first failing field as `stages[0].size: <what is wrong>, got 0`."""
    by_path: dict[str, list[dict]] = {}
    for e in error.errors():
        by_path.setdefault(_walk(cls, e["loc"])[0], []).append(e)
    path, errors = next(iter(by_path.items()))
    # A union (`lr: float | [lo, hi]`) reports each alternative: a value of the right type that is out of
    # range says more than "not a list".
    specific = [e for e in errors if not e["type"].endswith("_type")] or errors
    e = specific[0]
    if e["type"] == "value_error":
        return f"{path + ': ' if path else ''}{e['ctx']['error']}"
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = [f.name for f in dataclasses.fields(_walk(cls, e["loc"])[1])]
        return f"{path}{'.' if path else ''}{e['loc'][-1]}: unknown field; known: {', '.join(known)}"
    if e["type"] == "missing":
        return f"{path}: required field is missing"
    what = " or ".join(dict.fromkeys(x["msg"][0].lower() + x["msg"][1:] for x in specific))
    return f"{path}: {what}, got {e['input']!r}"


def _walk(cls: type, loc: tuple) -> tuple[str, type | None]:
    """pydantic's loc as a field path (the names of union alternatives, `float`, `tuple[...]`, dropped), and the
    config class the walk ends in: the one holding a last part that is no field (an unknown one)."""
    path, owner = "", cls
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif owner is not None and part in {f.name for f in dataclasses.fields(owner)}:
            path += f".{part}" if path else part
            owner = _dataclass_in(typing.get_type_hints(owner)[part])
    return path, owner


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    return next(filter(None, map(_dataclass_in, typing.get_args(tp))), None)


@config_model
class Stage:
    """One `fit_one_cycle` call of the notebook."""

    name: Str = flag(help="the stage's name: its file stages/NAME.pt and its rows in metrics.csv", pattern=r"^[^/]+$")
    size: Int = flag(help=f"input size in pixels ({MIN_SIZE}-{MAX_SIZE})", ge=MIN_SIZE, le=MAX_SIZE)
    epochs: Int = flag(help="epochs of its one-cycle schedule", gt=0)
    frozen: Bool = flag(help="train the head only (the body's weights stay)")
    lr: LearningRate | tuple[LearningRate, LearningRate] = flag(
        help="peak learning rate, or [lo, hi]: lo for the body's first layers rising to hi for the head (fastai's "
             "slice(lo, hi))")
    start_from: Str | None = flag(None, help="an earlier stage of this config, or a saved stage file (.pt) from "
                                  "another run; None: continue from the previous stage (the first stage starts from "
                                  "`weights`)")

    @property
    def start_file(self) -> str | None:
        """`start_from` when it is a saved stage file (.pt), not a stage of this config."""
        return self.start_from if self.start_from and self.start_from.endswith(".pt") else None

    @field_validator("lr")
    @classmethod
    def _lr_rises(cls, lr):
        if isinstance(lr, tuple) and lr[0] > lr[1]:
            raise ValueError(f"[lo, hi] needs lo <= hi, got {list(lr)}")
        return lr


MODEL, RAY, RUN, SPEED = "model and recipe", "Ray cluster", "run folder", "speed"


@config_model
class TrainConfig:
    stages: tuple[Stage, ...] = flag(help="the notebook's fit_one_cycle calls, in order", min_length=1)
    arch: Str = flag("resnet34", group=MODEL, help=f"the body: {', '.join(TORCHVISION_ARCHS)} (torchvision) or "
                     f"{TIMM_PREFIX}NAME (any timm model)")
    weights: Str = flag("none", group=MODEL, help="imagenet (torchvision's or timm's pretrained weights, from their "
                        "caches), none, or a state dict file (.pt/.pth/.safetensors) in the architecture's layout")
    batch_size: Int = flag(64, group=MODEL, help="images per batch on each worker", ge=1, le=65536)
    valid_pct: Float = flag(0.2, group=MODEL, help="share of the labelled images held out for validation", gt=0, lt=1)
    seed: Int = flag(42, group=MODEL, help="seed of the split, the initial head and the augmentations")
    threshold: Float = flag(0.2, group=MODEL, help="probability threshold of the F2 in the epoch table", gt=0, lt=1)
    weight_decay: Float = flag(1e-2, group=MODEL, help="AdamW weight decay", ge=0, le=1)
    dropout: Float = flag(0.5, group=MODEL, help="dropout of the head", ge=0, lt=1)
    valid_tta: Bool = flag(False, group=MODEL, help="validate on the mean of the 8 flips and quarter turns, as score "
                           "--tta predicts: the epoch table's F2 and the tuned thresholds are a TTA submission's "
                           "(validation takes 8x as long)")
    workers: Int = flag(2, group=RAY, help="Ray Train workers; 0 runs everything in the driver", ge=0, le=4096)
    cpus_per_worker: Float = flag(1.0, group=RAY, help="CPUs per worker (the rest of the cluster decodes)", gt=0,
                                  lt=1024)
    gpu: Bool = flag(False, group=RAY, help="one GPU per worker")
    precision: Precision = flag("auto", group=SPEED, help="auto (bf16 autocast where the hardware has native bf16), "
                                "fp32 or bf16")
    compile: Compile = flag("auto", group=SPEED, help="torch.compile the training model: auto (on a GPU, for long "
                            "stages; never on a CPU), on or off")
    torch_threads: Int = flag(0, group=SPEED, help="torch threads per worker; 0: its CPU share, at least 1", ge=0,
                              le=1024)
    max_failures: Int = flag(3, group=RAY, help="worker-group restarts from the latest checkpoint (-1: without end)",
                             ge=-1, le=1000)
    storage: Str | None = flag(None, group=RAY, help="Ray Train storage: local path, NFS or s3://bucket/prefix "
                               "(default RUN_DIR/ray)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = flag(
        "PACK", group=RAY, help="Ray placement of the workers")
    autoscale: Bool = flag(False, group=RAY, help="the cluster adds nodes on demand (cluster.yaml's GPU workers start "
                           "at 0): skip the up-front capacity check and let Ray Train wait for the autoscaler")
    data_shared: Bool = flag(False, group=RAY, help="the local --data path is mounted on every node (NFS): read it "
                             "everywhere, not only on the driver's node")
    folds: Int = flag(0, group=MODEL, help="K-fold: train K models, each holding out one K-th (OUT/fold-i/), tune "
                      "thresholds on all out-of-fold predictions and export the ensemble (OUT/export/); 0 trains one "
                      "model on a valid_pct split", le=1000)
    parallel_folds: Int = flag(0, group=RAY, help="folds trained at once (default: as many as the cluster holds)",
                               ge=0, le=1000)
    strict: Bool = flag(False, group=RUN, help="fail before training when a labelled image cannot be read, instead of "
                        "skipping it (listed in RUN_DIR/bad_train_images.csv)")
    overwrite: Bool = flag(False, group=RUN, help="start the run folder over; without it the same command resumes an "
                           "interrupted run where it stopped, and another config on that folder is refused")

    @model_validator(mode="after")
    def _consistent(self):
        if self.arch not in TORCHVISION_ARCHS and not (self.arch.startswith(TIMM_PREFIX) and self.arch != TIMM_PREFIX):
            raise ValueError(
                f"arch: unknown {self.arch!r}, choose one of {', '.join(TORCHVISION_ARCHS)} or "
                f"{TIMM_PREFIX}NAME (a timm model)"
            )
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage name {st.name!r}")
            if st.start_from is not None and st.start_file is None and st.start_from not in seen:
                raise ValueError(
                    f"stages[{i}].start_from: {st.start_from!r} is not an earlier stage "
                    f"(earlier: {seen or 'none'}) nor a saved stage file (.pt)"
                )
            seen.append(st.name)
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds: {self.folds} folds; K-fold needs at least 2 (0 trains one model)")
        return self


# Settings that change how a run is carried out, not the model it trains: a rerun on the same run folder (or of a
# K-fold run's finished folds) may change them.
HOW_NOT_WHAT = ("parallel_folds", "max_failures", "storage", "autoscale", "placement_strategy", "data_shared",
                "overwrite", "strict")

INPUT, OUTPUT, SCORING = "input", "output", "scoring"


@config_model
class ScoreConfig:
    model: tuple[Str, ...] = flag(group=INPUT, help="export folder, e.g. RUN_DIR/export (a path or a URI); repeat it "
                                  "to score an ensemble", min_length=1)
    out: Str = flag("submission.csv", group=OUTPUT, help="submission CSV, a path or a URI; side files go next to it")
    work_dir: Str | None = flag(None, group=OUTPUT, help="the run's Parquet shards, kept until it succeeds (default "
                                "OUT.parts next to --out; a path or a URI every node reaches); rerunning the same "
                                "command resumes from them")
    keep_parts: Bool = flag(False, group=OUTPUT, help="keep the work folder after success")
    shard_rows: Int = flag(1000, group=OUTPUT, help="rows per shard file (Ray Data's min_rows_per_file): what an "
                           "interruption can lose per write in flight, against files per run (61,191 images: 62 "
                           "shards)", ge=1, le=10_000_000)
    data: Str | None = flag(None, group=INPUT, help="Kaggle data root: test-jpg + test-jpg-additional in the sample "
                            "submission's order (a path or a URI: s3://bucket/prefix, gs://, hdfs://, file://)")
    images: Str | None = flag(None, group=INPUT, help="score any folder of .jpg files instead (a path or a URI)")
    threshold: Str = flag("0.2", group=SCORING, help="a number (default 0.2) or 'tuned' for the export's per-class "
                          "thresholds")
    # On by default: on held-out real chips it adds about 0.02 F2 for 8x the model's time (docs/training.md)
    tta: Bool = flag(True, group=SCORING, help="average the 8 flips and quarter turns (the default; --no-tta: one "
                     "view, 8x less model time)")
    batch_size: Int = flag(0, group=SPEED, help="images per predictor call; 0: 64 on CPU actors, 256 on GPU actors",
                           ge=0, le=65536)
    actors: Int = flag(0, group=RAY, help="predictor actors (default: one per GPU with gpus_per_actor, else one per "
                       "CPU of the cluster)", ge=0, le=4096)
    # With one actor per CPU, 0.25 leaves the read/decode tasks 3/4 of the cluster, and still half of it after a
    # lost node's actors restart elsewhere; at 0.5 those restarted actors took every CPU and scoring stalled
    # (tests/cluster/test_cluster.py). Same speed on 2 cores.
    cpus_per_actor: Float = flag(0.25, group=RAY, help="logical CPUs per predictor actor (its threads are "
                                 "--torch-threads)", gt=0, lt=1024)
    gpus_per_actor: Str = flag("auto", group=RAY, help="GPUs per predictor actor: auto (1 where the cluster has GPUs, "
                               "else 0) or a number")
    torch_threads: Int = flag(0, group=SPEED, help="torch threads per actor; 0: the node's cores shared among the "
                              "actors", ge=0, le=1024)
    probs_out: Str | None = flag(None, group=OUTPUT, help="also write every probability to this Parquet file (a path "
                                 "or a URI)")
    data_shared: Bool = flag(False, group=INPUT, help="the local --data/--images path is mounted on every node (NFS): "
                             "read it everywhere")
    strict: Bool = flag(False, group=INPUT, help="fail instead of giving unreadable images empty tags")
    overwrite: Bool = flag(False, group=OUTPUT, help="replace an existing output and start over (drops the work "
                           "folder's rows)")
    precision: Precision = flag("auto", group=SPEED, help="auto (bf16 where the hardware has it: a CPU with AVX-512 "
                                "BF16 or AMX, a bf16 GPU), fp32 or bf16")
    compile: Compile = flag("auto", group=SPEED, help="torch.compile the model: auto (when each actor has enough "
                            "images to pay it back), on or off")
    # A cluster that lost a node can otherwise wait without end: its restarted actors may take the CPUs the read
    # tasks need. Ray Data's no-progress guard (DataContext.execution_no_progress_timeout_s) applies it.
    stall_timeout_s: Float = flag(600.0, group=RAY, name="--stall-timeout", help="fail after this many seconds in "
                                  "which no block moves, so no new shard (default 600; 0 waits forever)", ge=0,
                                  le=7 * 86400)

    @field_validator("model", mode="before")
    @classmethod
    def _one_model(cls, value):
        return (value,) if isinstance(value, str) else value  # `model: path` for a list of one

    @field_validator("threshold", "gpus_per_actor", mode="before")
    @classmethod
    def _number_text(cls, value):
        # YAML's `threshold: 0.2`, `gpus_per_actor: 1` (not a bool: YAML's `yes` is no number)
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus(cls, value):
        return number_or_word(value, "auto", lambda x: 0 <= x <= 64, "[0, 64]")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value):
        return number_or_word(value, "tuned", lambda x: 0 < x < 1, "(0, 1)")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.data is None) == (self.images is None):
            raise ValueError("data / images: give exactly one of --data (Kaggle layout) or --images (a folder)")
        return self


TRACKING = "tracking"


@config_model
class TrackingConfig:
    """Where a job's MLflow runs go (planet_batch.tracking): flags only, never saved with a run, since a
    tracking URI may carry credentials."""

    tracking: Str | None = flag(None, group=TRACKING, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI; "
                                "neither: no tracking); credentials come from MLflow's environment variables")
    experiment: Str = flag("planet-batch", group=TRACKING, help="MLflow experiment the runs go to", min_length=1)
    log_model: Bool = flag(False, group=TRACKING, help="also log the export's weights (model.pt) as an artifact")
    log_submission: Bool = flag(False, group=TRACKING, help="also log the submission CSV as an artifact")

    @property
    def uri(self) -> str | None:
        return self.tracking or os.environ.get("MLFLOW_TRACKING_URI") or None


def from_dict(cls: type[T], data: Any) -> T:
    """Config `cls` from plain data (a YAML mapping), every field checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    return cls(**data)


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


def read_yaml(path: Path | str) -> Any:
    """A YAML file's data; a file that cannot be read or parsed is one ConfigError line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or first_line(e)}{where}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None


def load_config(
    cls: type[T], path: Path | str | None, overrides: Sequence[str] = (), values: dict[str, Any] | None = None
) -> T:
    """The YAML file at `path`, then `KEY=VALUE` overrides (parsed as YAML), then typed `values` (CLI flags)."""
    data = (read_yaml(path) or {}) if path is not None else {}
    try:
        return from_dict(cls, {**apply_overrides(data, overrides), **(values or {})})
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def save_config(cfg, path: Path | str) -> Path:
    from planet_batch.cluster.storage import write_atomic

    path = Path(path)
    write_atomic(path, lambda p: p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    return path
