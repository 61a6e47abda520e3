"""Process plumbing without Ray: the progress line, the worker room a training job leaves Ray Data."""

import logging

import pytest

from planet_batch.cluster import runtime
from planet_batch.cluster.runtime import DATA_CPUS, ProgressLine, runs_that_fit, worker_room


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


@pytest.mark.parametrize("resources, workers, cpus, gpu, most, fit", [
    ({"CPU": 2.0}, 1, 0.5, False, 5, 2),  # 2 cores: two half-CPU workers beside Ray Data's CPU
    ({"CPU": 2.0}, 1, 1.0, False, 5, 1),
    ({"CPU": 16.0}, 2, 1.0, False, 3, 3),  # no more than asked for
    ({"CPU": 16.0}, 4, 1.0, False, 8, 3),  # 15 CPUs beside Ray Data's hold three groups of 4 workers
    ({"CPU": 64.0, "GPU": 4.0}, 2, 1.0, True, 8, 2),  # two GPUs a run
    ({"CPU": 1.0}, 1, 1.0, False, 4, 1),  # at least one (its capacity check says why it cannot run)
    ({"CPU": 2.0}, 0, 1.0, False, 4, 1),  # local mode: a worker group of one
])
def test_runs_side_by_side_are_what_the_cluster_holds(monkeypatch, resources, workers, cpus, gpu, most, fit):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert runs_that_fit(workers, cpus, gpu, most) == fit
