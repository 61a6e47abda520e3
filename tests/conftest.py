import os
from pathlib import Path

import pytest

from planet_batch.demo_data import write_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small generated competition-layout dataset shared by the whole session (read-only by convention)."""
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", n_train=80, n_test=24, n_additional=16, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Planet files (../shared/data), when PLANET_SHARED_DATA points at them."""
    root = os.environ.get("PLANET_SHARED_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("PLANET_SHARED_DATA not set: real Planet data not available")
    return Path(root)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray with this machine's 2 CPUs, shared by one test module.

    The fault-injection folder goes into the environment before Ray starts, so every
    worker process inherits it; tests arm faults by creating files in it.
    """
    import ray

    from planet_batch.runtime import FAULT_DIR_ENV

    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_DIR_ENV] = str(fault_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield fault_dir
    ray.shutdown()
