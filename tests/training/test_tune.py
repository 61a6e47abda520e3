"""`planet-batch tune`: the search space's checks before Ray, and a search on demo data with Ray Tune (trials side
by side, ASHA stopping a bad one, a killed driver's search going on, the table, the best config, MLflow)."""

import json

import pytest
import yaml
from snapshots import refused

from planet_batch.config import ConfigError, TrainConfig, from_dict, load_config
from planet_batch.training.tune import SearchSpace, check_space, param_space, trial_config

STAGES = [{"name": "a", "size": 32, "epochs": 2, "frozen": True, "lr": 0.01},
          {"name": "b", "size": 32, "epochs": 2, "frozen": False, "lr": [1e-4, 1e-3]}]
TINY = ["arch=resnet18", "weights=none", "batch_size=8", "workers=1", "cpus_per_worker=0.5", "precision=fp32",
        f"stages={json.dumps(STAGES)}"]


def base(*extra) -> TrainConfig:
    return load_config(TrainConfig, None, [*TINY, *extra])


def space(**domains) -> SearchSpace:
    return from_dict(SearchSpace, {"space": {k.replace("__", "."): v for k, v in domains.items()}})


def test_a_trial_config_is_the_base_with_its_drawn_values_every_stage_at_once_with_a_star():
    cfg = trial_config(base(), {"stages.*.size": 48, "stages.1.lr": [1e-5, 2e-3], "dropout": 0.3})
    assert [st.size for st in cfg.stages] == [48, 48] and cfg.stages[1].lr == (1e-5, 2e-3)
    assert cfg.dropout == 0.3 and cfg.stages[0].lr == 0.01 and cfg.arch == "resnet18"


@pytest.mark.parametrize("domains, message", [
    ({"stages.2.lr": {"choice": [0.1]}}, "space: stages.2.lr: no '2' (the config has 2 stages)"),
    ({"nope": {"choice": [1]}}, "space: nope: unknown field; known: stages, arch,"),
    ({"dropout": {"uniform": [0.5, 0.2]}}, "space: dropout: uniform: expected [LO, HI] with LO < HI"),
    ({"dropout": {"uniform": [0.2, 1.5]}}, "space: dropout: input should be less than 1, got 1.5"),
    ({"stages.*.epochs": {"randint": [0, 3]}}, "space: stages.*.epochs: stages[0].epochs: input should be greater "
                                              "than 0, got 0"),
    ({"stages.0.lr": {"loguniform": [0, 0.1]}}, "space: stages.0.lr: loguniform: LO must be above 0"),
    ({"stages.0.epochs": {"randint": [1, 2.5]}}, "space: stages.0.epochs: randint: expected two integers"),
    ({"arch": {"choice": ["resnet34", "resnet99"]}}, "space: arch: unknown 'resnet99', choose one of"),
    ({"dropout": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "space: dropout: one of grid, choice, uniform, "
                                                           "loguniform, randint, got ['choice', 'uniform']"),
    ({"batch_size": {"grid": []}}, "space: batch_size: grid: expected a non-empty list"),
])
def test_every_value_a_space_can_draw_is_checked_against_the_config(domains, message):
    with pytest.raises(ConfigError) as e:
        check_space(base(), space(**{k.replace(".", "__"): v for k, v in domains.items()}))
    assert str(e.value).startswith(message), str(e.value)


def test_a_good_space_becomes_tunes_domains_with_both_ends_of_a_randint():
    from ray import tune

    good = space(arch={"grid": ["resnet18", "resnet34"]}, stages__0__epochs={"randint": [1, 3]},
                 stages__0__lr={"loguniform": [1e-3, 1e-1]}, batch_size={"choice": [8, 16]})
    check_space(base(), good)
    domains = param_space(good)
    assert domains["arch"] == {"grid_search": ["resnet18", "resnet34"]}
    assert isinstance(domains["stages.0.epochs"], tune.search.sample.Integer)
    assert (domains["stages.0.epochs"].lower, domains["stages.0.epochs"].upper) == (1, 4)  # upper exclusive
    assert domains["batch_size"].categories == [8, 16]


@pytest.mark.parametrize("text, message", [
    ("space: {}", "space: dictionary should have at least 1 item"),
    ("trials: 0\nspace: {dropout: {choice: [0.1]}}", "trials: input should be greater than or equal to 1"),
    ("space: {dropout: {normal: [0, 1]}}", "space: input should be 'grid', 'choice', 'uniform', 'loguniform' or "
                                          "'randint', got 'normal'"),
    ("space: [", "not valid YAML: expected the node content, but found '<stream end>' (line 1, column 9)"),
    ("space: {arch: {choice: [timm/efficientnet_lit0]}}", "timm has no model 'efficientnet_lit0'"),
])
def test_a_bad_search_space_is_one_line_exit_2_before_ray(demo_root, tmp_path, capsys, no_ray, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"stages": STAGES}))
    line = refused(tmp_path, capsys, "tune", "--config", config, "--space", path, "--data", demo_root,
                   "--out", tmp_path / "search", *[a for s in TINY[:-1] for a in ("--set", s)])
    assert message in line, line
    assert not (tmp_path / "search").exists()
