import re

import pytest

from planet_batch.config import (
    ConfigError,
    Stage,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

BASE = {
    "arch": "resnet18",
    "stages": [
        {"name": "stage-1", "size": 64, "epochs": 2, "frozen": True, "lr": 0.01},
        {"name": "stage-2", "size": 64, "epochs": 1, "frozen": False, "lr": [1e-5, 1e-3]},
    ],
}


def test_load_override_and_round_trip(tmp_path):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(TrainConfig, p, ["stages.1.epochs=3", "batch_size=16", "stages.0.lr=0.02"])
    assert cfg.stages[1].epochs == 3 and cfg.batch_size == 16 and cfg.stages[0].lr == 0.02
    assert cfg.stages[1].lr == (1e-5, 1e-3)
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(TrainConfig, saved) == cfg
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, field",
    [
        ("arch=resnet9", "arch"),
        ("stages.1.start_from=stage-9", "stages[1].start_from"),
        ("stages.0.lr=5.0", "lr"),
        ("stages.0.size=0", "size"),
        ("stages.0.epochs=two", "stages[0].epochs"),
        ("batch_size=0", "batch_size"),
        ("valid_pct=1.5", "valid_pct"),
        ("colour=blue", "colour"),
        ("workers=-1", "workers"),
    ],
)
def test_bad_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        from_dict(TrainConfig, apply_overrides(BASE, [override]))


def test_stage_from_earlier_stage_or_file():
    Stage("a", 64, 1, True, 0.01, start_from="old-run/stages/stage-2.pt")
    with pytest.raises(ConfigError, match="duplicate"):
        TrainConfig(stages=(Stage("a", 64, 1, True, 0.01), Stage("a", 64, 1, True, 0.01)))
