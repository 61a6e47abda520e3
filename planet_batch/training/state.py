"""What a training run carries between epochs, workers and the driver: `TrainState`, saved in every Ray Train
checkpoint as state.pt, and the stage files (RUN/stages/NAME.pt) made from it.

Both hold tensors and plain data only and are loaded `weights_only`, so reading a checkpoint or a stage file never
unpickles objects. Their keys are written and read here alone.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from planet_batch.cluster.storage import write_atomic
from planet_batch.config import Stage, TrainConfig, to_dict

STATE_FILE = "state.pt"

# What torch.load raises for a damaged state.pt, measured: cut short, RuntimeError ("PytorchStreamReader failed reading
# zip archive"); empty, EOFError; a flipped byte in its header or text, UnpicklingError. A checkpoint folder gone
# from storage: OSError. A file of another layout: KeyError or TypeError.
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError)


@dataclass(frozen=True)
class Position:
    """Where a run is: a stage of the config and the epoch within it."""

    stage: int
    epoch: int


def schedule(stages: tuple[Stage, ...], start: Position) -> list[Position]:
    """Every (stage, epoch) of the config from `start` on, in order."""
    every = [Position(i, e) for i, st in enumerate(stages) for e in range(st.epochs)]
    return every[every.index(start):] if start in every else []


def next_position(stages: tuple[Stage, ...], done: Position) -> Position:
    """The epoch after `done` (the stage's next, or the next stage's first)."""
    if done.epoch + 1 < stages[done.stage].epochs:
        return Position(done.stage, done.epoch + 1)
    return Position(done.stage + 1, 0)


@dataclass
class History:
    """Every epoch's metrics row and batch losses of a run so far, and the (stage name, epoch) checkpoints it
    resumed after."""

    epochs: list[dict] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    resumed_after: list[tuple[str, int]] = field(default_factory=list)

    def epochs_of(self, stage: str) -> list[int]:
        """The epochs of `stage` this run resumed after."""
        return [e for name, e in self.resumed_after if name == stage]


@dataclass
class TrainState:
    """Everything a resumed run needs to go on exactly where it stopped, and the driver to write the run folder.

    `valid_probs`/`valid_targets`: the whole validation pass of a stage's last epoch (the export tunes its
    thresholds on the last stage's), None at other epochs."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    done: Position  # the epoch this state is the end of
    history: History
    kept: dict[str, dict[str, torch.Tensor]]  # final weights of the stages a later stage starts from
    config: dict
    valid_probs: np.ndarray | None = None
    valid_targets: np.ndarray | None = None

    @property
    def stage_end(self) -> bool:
        return self.valid_probs is not None

    def save(self, folder: Path | str) -> Path:
        path = Path(folder) / STATE_FILE
        plain = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "done": [self.done.stage, self.done.epoch], "history": asdict(self.history), "kept": self.kept,
                 "config": self.config}
        if self.stage_end:
            plain |= {"valid_probs": torch.from_numpy(self.valid_probs),
                      "valid_targets": torch.from_numpy(self.valid_targets)}
        torch.save(plain, path)
        return path

    @classmethod
    def load(cls, folder: Path | str) -> TrainState:
        """The state saved in `folder`; raises one of UNREADABLE when it is damaged."""
        plain = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        history = plain["history"]
        probs, targets = plain.get("valid_probs"), plain.get("valid_targets")
        return cls(model=plain["model"], optimizer=plain["optimizer"], scheduler=plain["scheduler"],
                   done=Position(*plain["done"]),
                   history=History(history["epochs"], history["batch_losses"],
                                   [tuple(r) for r in history["resumed_after"]]),
                   kept=plain["kept"], config=plain["config"],
                   valid_probs=None if probs is None else probs.numpy(),
                   valid_targets=None if targets is None else targets.numpy())

    @classmethod
    def from_checkpoint(cls, checkpoint) -> TrainState:
        """The state a Ray Train checkpoint holds (from storage: a download for a bucket)."""
        with checkpoint.as_directory() as d:
            return cls.load(d)

    def save_stage(self, run_dir: Path, cfg: TrainConfig) -> Path:
        """RUN_DIR/stages/NAME.pt: the stage's final weights, which a later config can `start_from`."""
        stage = cfg.stages[self.done.stage]
        path = run_dir / "stages" / f"{stage.name}.pt"
        write_atomic(path, lambda p: torch.save(
            {"model": self.model, "arch": cfg.arch, "stage": stage.name, "size": stage.size, "config": to_dict(cfg),
             "metrics": self.history.epochs[-1], "resumed_after": self.history.epochs_of(stage.name)}, p))
        return path


def load_stage_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The model weights of a stage file (TrainState.save_stage); raises one of UNREADABLE."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]
