"""The run folder a training job writes from the checkpoints Ray Train kept: config.yaml, stages/NAME.pt,
metrics.csv, losses.png and export/; and the rules that a run folder holds one run and is planet-batch's.

A run folder is marked by RUN/run.json, which holds its run id (also in its Ray Train run's name). Training
writes only the names in `WRITTEN` into it, and into a folder without run.json only when none of them is there:
a folder holding someone else's config.yaml or export/ is refused, with or without --overwrite, which removes
only those names (and the folder's own Ray Train run).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import uuid
from pathlib import Path

from planet_batch.cluster.storage import locate, write_atomic
from planet_batch.config import HOW_NOT_WHAT, TrainConfig, load_config, to_dict
from planet_batch.data.labels import TAGS
from planet_batch.errors import first_line
from planet_batch.export import ExportMeta, save_export
from planet_batch.model import normalization
from planet_batch.tracking import RUN_FILE
from planet_batch.training import TrainError
from planet_batch.training.metrics import best_constant_fbeta, fbeta, tune_thresholds
from planet_batch.training.state import TrainState
from planet_batch.training.steps import fold_prefix

log = logging.getLogger("planet_batch.training.train")

METRIC_COLUMNS = ("stage", "epoch", "train_loss", "valid_loss", "accuracy_thresh", "fbeta", "time", "precision",
                  "compiled")


def write_metrics(run_dir: Path, rows: list[dict], columns: tuple[str, ...] = METRIC_COLUMNS) -> Path:
    """RUN_DIR/metrics.csv, atomically: a run's epoch rows (or, for K folds, folds.FOLD_COLUMNS)."""
    def write(p: Path):
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in columns} for r in rows)  # (older runs lack the mode)

    write_atomic(run_dir / "metrics.csv", write)
    return run_dir / "metrics.csv"


def same_run(a: TrainConfig, b: TrainConfig) -> str | None:
    """None when `a` and `b` train the same model (settings of how a run is carried out may differ), else the first
    field that differs, as `stages[1].epochs: 3 -> 4`."""
    def first_difference(old, new, path: str) -> str | None:
        if isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys():
            return next((d for k in old if (d := first_difference(old[k], new[k], f"{path}.{k}"))), None)
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            return next((d for i, (x, y) in enumerate(zip(old, new)) if (d := first_difference(x, y, f"{path}[{i}]"))),
                        None)
        return None if old == new else f"{path}: {old} -> {new}"

    old, new = to_dict(a), to_dict(b)
    return next((d for k in old if k not in HOW_NOT_WHAT and (d := first_difference(old[k], new[k], k))), None)


def ray_storage(cfg: TrainConfig, run_dir: Path) -> str:
    return cfg.storage or str(run_dir / "ray")


RUN_ID_FILE = "run.json"
# What training writes into a run folder (K folds: fold-i/, oof.parquet); the default Ray storage is `ray/`.
WRITTEN = ("config.yaml", "stages", "export", "metrics.csv", "losses.png", RUN_FILE, "ray", "oof.parquet",
           "bad_train_images.csv")
FOLD_DIR = re.compile(r"fold-\d+$")


def run_id(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"run folder {run_dir}: {RUN_ID_FILE} is not planet-batch's ({first_line(e)}); give "
                         "another --out") from None


def run_name(run_dir: Path) -> str:
    """The Ray Train run of a run folder: the same for every command on that folder (so a new trainer resumes it,
    Ray Train's job-driver fault tolerance), another for any other run folder sharing the storage, also one at the
    same path on another machine (its run id)."""
    return f"{run_dir.name}-{run_id(run_dir)}"


def new_run_id(run_dir: Path) -> None:
    write_atomic(run_dir / RUN_ID_FILE, lambda p: p.write_text(json.dumps({"run_id": uuid.uuid4().hex[:12]})))


def check_run_folder(run_dir: Path) -> None:
    """Refuse a folder that holds what training would write but did not write (module doc); writes nothing."""
    if (run_dir / RUN_ID_FILE).is_file():
        run_id(run_dir)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"run folder {run_dir} is a file; give another --out")
    theirs = sorted(n for n in (p.name for p in run_dir.iterdir()) if n in WRITTEN or FOLD_DIR.match(n)) \
        if run_dir.is_dir() else []
    if theirs:
        raise TrainError(f"run folder {run_dir} holds {', '.join(theirs)}, not written by planet-batch (no "
                         f"{RUN_ID_FILE}): give another --out; nothing there is touched")


def mark_run_folder(run_dir: Path) -> None:
    """Make a checked folder a run folder (its run.json with a new run id), at training's first write to it."""
    if not (run_dir / RUN_ID_FILE).is_file():
        new_run_id(run_dir)


def local_checkpoints(cfg: TrainConfig, storage: str, name: str) -> str | None:
    """Local mode's checkpoint folders (Ray Train keeps a reference to each instead of copying it to storage)."""
    return None if cfg.workers else str(Path(storage) / name / "local")


def claim_run_folder(run_dir: Path, cfg: TrainConfig) -> None:
    """A run folder holds one run: the same config goes on where it stopped, another is refused, and
    `overwrite` starts over (the folder's files and its Ray Train run go, and it gets a new run id). A folder that
    is not a run folder yet is only checked here (`mark_run_folder` makes it one)."""
    check_run_folder(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    if cfg.overwrite:
        ray_run = locate(ray_storage(cfg, run_dir)) / run_name(run_dir)
        for path in (run_dir / n for n in WRITTEN if n != "ray"):  # (a new MLflow run too; ray/: below)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if ray_run.is_dir():
            ray_run.fs.delete_dir(ray_run.path)
        new_run_id(run_dir)
        return
    differs = same_run(load_config(TrainConfig, saved), cfg)
    if differs:
        raise TrainError(f"run folder {run_dir} holds a run of another config ({differs}): the same config resumes "
                         "it, --overwrite starts over")


def write_run_folder(run_dir: Path, cfg: TrainConfig, result) -> TrainState:
    """stages/NAME.pt from each stage's last checkpoint, metrics.csv and losses.png from the final one (every
    epoch of the run once, however often it resumed); the final state."""
    from ray.train import Checkpoint

    from planet_batch.training.plots import plot_losses

    local = local_checkpoints(cfg, ray_storage(cfg, run_dir), run_name(run_dir))
    if local is None:
        ends = [c for c, m in result.best_checkpoints if m.get("stage_end")]
    else:  # local mode keeps no ranking: every epoch's checkpoint is a folder of its own
        ends = [Checkpoint.from_directory(d) for d in sorted(Path(local).glob("checkpoint_*"))]
    states = {c.path: TrainState.from_checkpoint(c) for c in ends}
    for state in states.values():
        if state.stage_end:  # (local mode: every epoch's)
            log.info("stage %s saved to %s", cfg.stages[state.done.stage].name, state.save_stage(run_dir, cfg))
    # The run's last checkpoint is the last stage's end, read above (a download, with storage on S3)
    final = states.get(result.checkpoint.path) or TrainState.from_checkpoint(result.checkpoint)
    history = final.history
    write_metrics(run_dir, history.epochs)
    per_epoch = len(history.batch_losses) // max(1, len(history.epochs))
    plot_losses(history.batch_losses, [(k + 1) * per_epoch for k in range(len(history.epochs))],
                [r["valid_loss"] for r in history.epochs], run_dir / "losses.png")
    return final


def export_run(run_dir: Path, cfg: TrainConfig, state: TrainState, fold: str = "",
               tracking_run: str | None = None) -> Path:
    """RUN_DIR/export: the final weights with thresholds tuned for F2 on the last validation pass."""
    probs, targets = state.valid_probs, state.valid_targets
    thresholds = tune_thresholds(probs, targets, start=cfg.threshold)
    final = {**state.history.epochs[-1], "fbeta_tuned": fbeta(probs, targets, thresholds),
             "best_constant_fbeta": best_constant_fbeta(targets), "n_valid": len(probs)}
    export = save_export(run_dir / "export", state.model, ExportMeta(
        arch=cfg.arch, tags=TAGS, size=cfg.stages[-1].size, normalize=normalization(cfg.arch), threshold=cfg.threshold,
        thresholds=thresholds, dropout=cfg.dropout, config=to_dict(cfg), metrics=final, tracking_run=tracking_run))
    log.info("%sfinal: F2 %.4f at %.2f, %.4f with tuned thresholds; best constant prediction %.4f",
             fold_prefix(fold), final["fbeta"], cfg.threshold, final["fbeta_tuned"],
             final["best_constant_fbeta"])
    return export
