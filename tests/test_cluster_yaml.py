"""cluster.yaml must stay something `ray up` accepts: validated by Ray's own cluster-config schema."""

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_cluster_config(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_a_broken_config_is_caught_by_the_same_check(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero"):
        validate_config(prepare_config(broken))


def test_gpu_workers_scale_from_zero_to_eight(cluster):
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8
    assert gpu["node_config"]["InstanceType"].startswith("g5.")


def test_pins_match_this_checkout(cluster):
    setup = " ".join(cluster["setup_commands"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
    assert f"== '{version}'" in setup
    assert f"ray[data,train,default]=={importlib.metadata.version('ray')}" in setup


def test_dashboard_only_on_loopback_and_token_auth_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()


def test_no_secrets_in_the_file():
    text = (ROOT / "cluster.yaml").read_text()
    secrets = (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key\s*[:=]", r"KAGGLE_KEY\s*[:=]\s*\S", r"BEGIN .*PRIVATE")
    for pattern in secrets:
        assert not re.search(pattern, text), pattern
