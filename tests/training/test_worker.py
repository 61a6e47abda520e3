"""The worker's resume logic without Ray: which checkpoint a restarted worker group goes on from, and where."""

import contextlib
import logging
import shutil
from dataclasses import dataclass

import pytest
import ray.train
from test_state import STAGES, state

from planet_batch.config import TrainConfig
from planet_batch.training import worker
from planet_batch.training.state import History, Position


@pytest.fixture(autouse=True)
def logged(monkeypatch):
    """planet_batch's lines reach caplog even after a CLI test set up its own handler (which stops propagation)."""
    monkeypatch.setattr(logging.getLogger("planet_batch"), "propagate", True)


@dataclass
class FakeCheckpoint:
    """Ray Train's Checkpoint as the worker uses it: a path, and a local folder holding it."""

    path: str

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


@dataclass
class Reported:
    checkpoint: FakeCheckpoint
    metrics: dict


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """Three reported checkpoints (steps 1-3, the last the latest) as Ray Train would give them to a worker."""
    reported = []
    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint_{step}"
        folder.mkdir()
        state().save(folder)
        reported.append(Reported(FakeCheckpoint(str(folder)), {"step": step, "epoch": step - 1}))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: reported[-1].checkpoint)
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda: list(reported))
    return reported


def cut(reported: Reported) -> None:
    path = f"{reported.checkpoint.path}/state.pt"
    with open(path, "r+b") as f:
        f.truncate(100)


def test_a_restart_resumes_from_the_latest_checkpoint(checkpoints, caplog):
    assert worker.restore(0) is not None
    assert not caplog.records


def test_a_latest_checkpoint_cut_short_falls_back_to_the_newest_readable_one_with_one_warning(checkpoints, caplog,
                                                                                              monkeypatch):
    cut(checkpoints[2])
    cut(checkpoints[1])
    loaded = []
    monkeypatch.setattr(worker.TrainState, "from_checkpoint",
                        classmethod(lambda cls, c: loaded.append(c.path) or cls.load(c.path)))
    with caplog.at_level(logging.WARNING, "planet_batch"):
        assert worker.restore(0, "fold-1") is not None
    assert loaded == [checkpoints[i].checkpoint.path for i in (2, 1, 0)]  # newest first
    (record,) = caplog.records
    assert record.getMessage().startswith("fold-1: the latest checkpoint") and "epoch 0" in record.getMessage()


def test_no_readable_checkpoint_starts_the_run_over_and_only_rank_0_says_so(checkpoints, caplog):
    for r in checkpoints:
        cut(r)
    with caplog.at_level(logging.WARNING, "planet_batch"):
        assert worker.restore(1) is None
        assert not caplog.records
        assert worker.restore(0) is None
    assert "starting the run over" in caplog.records[0].getMessage()


def test_a_fresh_run_has_nothing_to_restore(monkeypatch):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert worker.restore(0) is None


def resumed(saved) -> tuple[Position, worker.Worker]:
    w = object.__new__(worker.Worker)  # the resume logic alone: no Ray Train context
    w.cfg, w.rank, w.fold, w.history, w.kept = TrainConfig(arch="resnet18", stages=STAGES), 0, "", History(), {}
    return w.resume_position(saved), w


def test_a_resumed_worker_goes_on_after_the_checkpoint_with_its_history():
    saved = state()  # the end of stage b (index 1), epoch 0
    start, w = resumed(saved)
    assert start == Position(2, 0)
    assert w.history.epochs == saved.history.epochs and w.kept is saved.kept
    assert w.history.resumed_after == [("a", 1), ("b", 0)]
    assert resumed(None)[0] == Position(0, 0)


def test_a_checkpoint_of_the_last_epoch_leaves_nothing_to_train(caplog):
    saved = state()
    saved.done = Position(2, 2)
    with caplog.at_level(logging.INFO, "planet_batch"):
        start, _ = resumed(saved)
    assert start == Position(3, 0) and worker.schedule(STAGES, start) == []
    assert "nothing left to train" in caplog.records[-1].getMessage()


@pytest.fixture
def ray_calls(monkeypatch):
    """Ray Train's report and registration wait replaced by a log of the calls (what each report carried)."""
    calls = []

    def report(metrics, checkpoint=None, **kwargs):
        folder = checkpoint.path if checkpoint else None
        loaded = worker.TrainState.load(folder) if folder else None
        calls.append(("report", metrics["step"], folder, loaded, kwargs.get("checkpoint_upload_mode")))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda: calls.append(("wait",)) or [])
    return calls


def test_rank_0_uploads_its_checkpoint_in_the_background_and_waits_for_it_before_the_next_report(ray_calls):
    reports = worker.Reports(None)
    reports.registered()  # nothing reported yet: nothing to wait for
    saved = state()
    reports.report({"step": 1}, saved)
    (call,) = ray_calls
    _, step, folder, loaded, mode = call
    assert mode == ray.train.CheckpointUploadMode.ASYNC  # the next epoch trains while it uploads
    assert "planet-batch-checkpoint-" in folder  # a temporary folder, Ray's to delete once uploaded
    assert loaded.done == saved.done and loaded.history == saved.history  # the whole state, on disk already
    shutil.rmtree(folder)  # as Ray does after the upload
    reports.registered()
    reports.registered()  # once per report
    reports.report({"step": 2}, None)  # another rank's report: no checkpoint, still one to wait for
    reports.registered()
    assert [c[0] for c in ray_calls] == ["report", "wait", "report", "wait"]
    assert ray_calls[2][2] is None


def test_local_mode_keeps_its_own_checkpoint_folders_and_has_nothing_to_wait_for(ray_calls, tmp_path):
    reports = worker.Reports(str(tmp_path))
    reports.report({"step": 3}, state())
    reports.registered()
    (call,) = ray_calls
    assert call[2] == str(tmp_path / "checkpoint_000003") and call[3] is not None and call[4] is None
