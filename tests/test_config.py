import re

import pytest

from planet_batch.config import (
    ConfigError,
    ScoreConfig,
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
    from_file = Stage("a", 64, 1, True, 0.01, start_from="old-run/stages/stage-2.pt")
    assert from_file.start_file == "old-run/stages/stage-2.pt"
    later = Stage("b", 64, 1, False, 0.01, start_from="a")
    assert later.start_file is None and TrainConfig(stages=(from_file, later)).stages[1].start_from == "a"
    with pytest.raises(ConfigError, match=r"stages\[1\]\.start_from: 'c' is not an earlier stage"):
        TrainConfig(stages=(from_file, Stage("b", 64, 1, False, 0.01, start_from="c")))
    with pytest.raises(ConfigError, match="duplicate"):
        TrainConfig(stages=(Stage("a", 64, 1, True, 0.01), Stage("a", 64, 1, True, 0.01)))


def _wrong_value(tp):
    """A value of the wrong type for a field annotated `tp`."""
    text = str(tp)
    if "bool" in text and "int" not in text:
        return "yes please"
    if "str" in text and "float" not in text:
        return 123 if "None" not in text else ["a", "list"]
    return "not-a-number"


@pytest.mark.parametrize("cls, base", [(TrainConfig, BASE), (ScoreConfig, {"model": "m", "images": "i"})])
def test_every_field_of_the_wrong_type_is_rejected_by_name(cls, base):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name == "stages":
            continue
        with pytest.raises(ConfigError, match=re.escape(field.name)):
            from_dict(cls, {**base, field.name: _wrong_value(hints[field.name])})


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("valid_pct", 0.0), ("threshold", 1.0), ("weight_decay", -0.1), ("dropout", 1.0),
     ("workers", -1), ("cpus_per_worker", 0.0), ("torch_threads", -1), ("max_failures", -2),
     ("placement_strategy", "ANYWHERE")],
)
def test_every_train_field_out_of_range_is_rejected_by_name(field, value):
    with pytest.raises(ConfigError, match=re.escape(field)):
        from_dict(TrainConfig, {**BASE, field: value})


@pytest.mark.parametrize(
    "field, value",
    [("threshold", "1.5"), ("threshold", "high"), ("batch_size", -1), ("actors", -1), ("cpus_per_actor", 0.0),
     ("gpus_per_actor", -1.0), ("gpus_per_actor", "many"), ("gpus_per_actor", True), ("torch_threads", -1),
     ("stall_timeout_s", -1.0)],
)
def test_every_score_field_out_of_range_is_rejected_by_name(field, value):
    with pytest.raises(ConfigError, match=re.escape(field)):
        from_dict(ScoreConfig, {"model": "m", "images": "i", field: value})


def test_precision_and_compile_take_their_words_and_yaml_on_off(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("arch: resnet18\nprecision: bf16\ncompile: on\n"
                 "stages: [{name: s, size: 32, epochs: 1, frozen: false, lr: 0.01}]\n")
    assert (load_config(TrainConfig, p).precision, load_config(TrainConfig, p).compile) == ("bf16", "on")
    assert load_config(TrainConfig, p, ["compile=off"]).compile == "off"  # YAML reads off as false
    score = {"model": "m", "images": "i"}
    assert from_dict(ScoreConfig, {**score, "compile": False}).compile == "off"
    for field, value in [("precision", "fp16"), ("compile", "maybe"), ("precision", True)]:
        with pytest.raises(ConfigError, match=re.escape(field)):
            from_dict(ScoreConfig, {**score, field: value})
        with pytest.raises(ConfigError, match=re.escape(field)):
            load_config(TrainConfig, p, [f"{field}={value}"])


def test_a_config_file_that_is_not_yaml_or_cannot_be_read_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: resnet18\nstages: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, bad)
    assert str(e.value) == (f"{bad}: not valid YAML: expected the node content, but found '<stream end>' "
                            "(line 3, column 1)")
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read config: No such file or directory$"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
