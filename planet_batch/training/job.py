"""Where training starts: `planet-batch train`, `lesson3` and jobs/train.py make a `TrainJob` and run it.

    TrainJob.run
      train.run_training        one model: checks, run folder, MLflow run, then Ray Train (train.fit_run)
        worker.train_loop         on every worker: the config's stages, epoch by epoch (Worker), checkpoints
        run_folder                back in the driver: stages/, metrics.csv, losses.png, export/ from the checkpoints
      folds.run_folds           with `folds: K`: K run_training side by side, out-of-fold thresholds, the ensemble
    tune.run_search             `planet-batch tune`: Ray Tune trials, each run_training of a drawn config
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planet_batch.cluster.storage import Location, locate
from planet_batch.config import TrainConfig
from planet_batch.tracking import Tracker
from planet_batch.training.folds import run_folds
from planet_batch.training.train import run_training


@dataclass(frozen=True)
class TrainJob:
    """One training job: its config, the data root (a path or a URI), the run folder, and the MLflow server its
    runs go to (None: no tracking)."""

    cfg: TrainConfig
    data: Location
    out: Path
    tracker: Tracker | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, data: Path | str, out: Path | str, tracker: Tracker | None = None) -> TrainJob:
        return cls(cfg, locate(data), Path(out).resolve(), tracker)

    def run(self) -> Path:
        """K folds and their ensemble export with `folds: K`, else one model; the export folder."""
        return run_folds(self) if self.cfg.folds else run_training(self)


def train(cfg: TrainConfig, data: Path | str, out: Path | str, tracker: Tracker | None = None) -> Path:
    """`planet-batch train`: the job of `cfg` on `data` into the run folder `out`; the export folder."""
    return TrainJob.of(cfg, data, out, tracker).run()
