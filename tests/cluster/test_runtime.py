"""Process plumbing without Ray: the progress line, the worker room a training job leaves Ray Data."""

import logging

import pytest

from planet_batch.cluster import runtime
from planet_batch.cluster.runtime import DATA_CPUS, ProgressLine, worker_room


@pytest.fixture(autouse=True)
def logged(monkeypatch):
    monkeypatch.setattr(logging.getLogger("planet_batch"), "propagate", True)


def test_a_progress_detail_is_made_only_when_a_line_is_printed(monkeypatch, caplog):
    """Training passes its running loss as a callable: reading it waits for a GPU, so only a printed line may."""
    clock = iter(range(0, 1000, 4))
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: float(next(clock)))
    made = []

    def detail():
        made.append(1)
        return "loss 0.5000"

    line = ProgressLine("images", 100, every_s=10)
    with caplog.at_level(logging.INFO, "planet_batch"):
        for _ in range(9):
            line.update(10, detail)
    assert len(made) == len(caplog.records) > 0 and len(made) < 9
    assert caplog.records[0].getMessage().endswith(", loss 0.5000")


def test_the_worker_room_leaves_ray_data_its_cpus():
    assert DATA_CPUS == 1
    assert worker_room(2, 0.5) == 2 and worker_room(2, 1) == 1 and worker_room(1, 0.5) == 0
    assert worker_room(1.9, 0.3) == 3  # (0.9 / 0.3: not 2.9999)
    assert worker_room(0, 1) == 0
