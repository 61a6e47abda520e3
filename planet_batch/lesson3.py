"""The whole lesson-3 notebook as one job: train the stages, export, score the test set, submit."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from planet_batch.config import ScoreConfig, TrainConfig
from planet_batch.data.submission import check_submission
from planet_batch.errors import PlanetBatchError
from planet_batch.scoring.score import ScoreSummary, expected_images, run_scoring
from planet_batch.tracking import Tracker
from planet_batch.training.job import train

log = logging.getLogger(__name__)


class SubmissionError(PlanetBatchError, RuntimeError):
    pass


@dataclass(frozen=True)
class Lesson3Result:
    export: Path
    submission: ScoreSummary
    submitted: bool


def scoring_config(train_cfg: TrainConfig, data_root: Path | str, run_dir: Path, **score_fields) -> ScoreConfig:
    """How lesson3 scores the test set with the export it trained: into the run folder, on the cluster's GPUs
    where it has them (gpus_per_actor auto), as a GPU-trained config expects."""
    return ScoreConfig(model=str(run_dir / "export"), data=str(data_root), out=str(run_dir / "submission.csv"),
                       overwrite=True, data_shared=train_cfg.data_shared, probs_out=str(run_dir / "probs.parquet"),
                       **score_fields)


def run_lesson3(train_cfg: TrainConfig, data_root: Path | str, run_dir: Path | str,
                submit_message: str | None = None, tracker: Tracker | None = None, **score_fields) -> Lesson3Result:
    """Train -> export -> score test-jpg + test-jpg-additional -> check -> (optionally) submit to Kaggle.

    `score_fields`: ScoreConfig fields for the scoring (threshold, tta); checked before training starts.
    `tracker`: the training run and the scoring run in MLflow."""
    from planet_batch.data.kaggle import submit
    from planet_batch.data.layout import find_layout

    run_dir = Path(run_dir)
    score_cfg = scoring_config(train_cfg, data_root, run_dir, **score_fields)
    layout = find_layout(data_root, need=("train", "test"))  # both halves exist before hours of training
    expected_images(score_cfg)  # and the sample submission against the test images, as scoring checks them
    export = train(train_cfg, data_root, run_dir, tracker)  # one model, or with folds: K the fold ensemble
    summary = run_scoring(dataclasses.replace(score_cfg, model=(str(export),)), tracker)
    problems = check_submission(summary.output, layout.sample_submission)
    if problems:
        raise SubmissionError(f"{summary.output} failed its check: {'; '.join(problems)}")
    if submit_message:
        submit(summary.output, submit_message, sample=layout.sample_submission)
    return Lesson3Result(export, summary, submitted=bool(submit_message))
