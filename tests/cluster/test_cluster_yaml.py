"""cluster.yaml must stay something `ray up` accepts: validated by Ray's own cluster-config schema."""

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


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


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in (x.split("#")[0].strip() for x in lines) if line)


def test_every_node_installs_this_checkout_with_the_tested_pins(cluster):
    setup = " ".join(cluster["setup_commands"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
    assert f"== '{version}'" in setup
    assert "-c /home/ubuntu/planet-batch/constraints.txt '/home/ubuntu/planet-batch[pretrained]'" in setup
    assert "==" not in setup.replace(f"== '{version}'", ""), "versions belong in constraints.txt only"


def test_the_pins_fit_pyproject_and_are_what_this_checkout_runs():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pinned = pins()
    for dep in deps:
        assert dep.name.lower() in pinned, f"{dep.name} has no pin in constraints.txt"
        assert dep.specifier.contains(pinned[dep.name.lower()]), f"{dep.name}=={pinned[dep.name.lower()]} vs {dep}"
    for name, version in pinned.items():
        assert importlib.metadata.version(name) == version, f"this venv runs {name} {importlib.metadata.version(name)}"


def test_gpu_workers_reach_s3_through_an_instance_profile(cluster):
    assert cluster["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]


def test_dashboard_only_on_loopback_and_token_auth_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()


def test_no_secrets_in_the_file():
    text = (ROOT / "cluster.yaml").read_text()
    secrets = (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key\s*[:=]", r"KAGGLE_KEY\s*[:=]\s*\S", r"BEGIN .*PRIVATE")
    for pattern in secrets:
        assert not re.search(pattern, text), pattern
