"""Exports checked at load: every field of model.json, and model.pt against the arch, before any work."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import tiny_export
from snapshots import refused

from planet_batch.data.labels import TAGS
from planet_batch.export import ExportError, ExportMeta, load_export, save_export
from planet_batch.model import build_model, normalization


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def meta(export):
    return json.loads((export / "model.json").read_text())


def swapped(tags, i, j):
    tags = list(tags)
    tags[i], tags[j] = tags[j], tags[i]
    return tags


BAD = {  # model.json field -> (value, the line's text after "model.json: ")
    "tags-missing": ("tags", list(TAGS[:-1]), "tags: must be the competition's 17 tags in any order (missing water)"),
    "tags-unknown": ("tags", [*TAGS[:-1], "lake"], "tags: must be the competition's 17 tags in any order (missing "
                     "water; unknown lake)"),
    "tags-twice": ("tags", [*TAGS[:-1], "clear"], "tags: must be the competition's 17 tags in any order (missing "
                   "water; repeated clear)"),
    "arch": ("arch", "resnet999", "arch: unknown 'resnet999': resnet18, resnet34, resnet50 or timm/NAME"),
    "timm-arch": ("arch", "timm/resnet999", "arch: timm has no model 'resnet999'; close: resnet50, resnet34, "
                  "resnet26"),
    "dropout": ("dropout", 1.0, "dropout: input should be less than 1, got 1.0"),
    "size": ("size", 100000, "size: input should be less than or equal to 1024, got 100000"),
    "std": ("normalize", {"mean": [0.5] * 3, "std": [0.5, 0, 0.5]}, "normalize: std must be 3 numbers in (0, 1], "
            "got [0.5, 0.0, 0.5]"),
    "mean": ("normalize", {"mean": [0.5, 128, 0.5], "std": [0.5] * 3}, "normalize: mean must be 3 numbers in [0, 1], "
             "got [0.5, 128.0, 0.5]"),
}


def refused_export(tmp_path, model, demo_root, capsys) -> str:
    """`planet-batch score` on `model`: exit 2, no Ray, nothing written or changed; its one line."""
    return refused(tmp_path, capsys, "score", "--model", model, "--data", demo_root, "--out", tmp_path / "s.csv")


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_field_is_one_line_naming_it_before_any_work(export, meta, demo_root, tmp_path, capsys, no_ray,
                                                              case):
    field, value, line = BAD[case]
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    (bad / "model.json").write_text(json.dumps({**meta, field: value}))
    assert refused_export(tmp_path, bad, demo_root, capsys) == f"{bad / 'model.json'}: {line}"


def test_weights_for_another_arch_or_not_finite_are_one_line(export, meta, demo_root, tmp_path, capsys, no_ray):
    other = tmp_path / "other"
    shutil.copytree(export, other)
    torch.save(build_model("resnet34", len(TAGS)).state_dict(), other / "model.pt")
    line = refused_export(tmp_path, other, demo_root, capsys)
    assert line.startswith(f"{other / 'model.pt'}: not weights of resnet18 (Error(s) in "
                           "loading state_dict for Sequential:"), line
    state = torch.load(export / "model.pt", weights_only=True)
    state["1.8.weight"][3, 5] = float("nan")
    torch.save(state, other / "model.pt")
    assert refused_export(tmp_path, other, demo_root, capsys) == (
        f"{other / 'model.pt'}: 1.8.weight holds NaN or infinite values")


def numbers(lo, hi):
    """Floats near and beyond [lo, hi], NaN and infinities included, and ints."""
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(lo - 1, hi + 1),
                     st.sampled_from([lo, hi]), st.integers(-3, 3))


@st.composite
def model_json(draw, meta):
    tags = draw(st.one_of(st.permutations(TAGS),
                          st.lists(st.sampled_from([*TAGS, "lake", ""]), min_size=15, max_size=18)))
    return {**meta, "tags": list(tags),
            "size": draw(st.one_of(st.integers(-5, 2000), st.sampled_from([31, 32, 1024, 1025]))),
            "dropout": draw(numbers(0, 1)),
            "normalize": {"mean": draw(st.lists(numbers(0, 1), min_size=3, max_size=3)),
                          "std": draw(st.lists(numbers(0, 1), min_size=3, max_size=3))},
            "thresholds": [0.2] * len(tags)}


def acceptable(m: dict) -> bool:
    """The rule, written independently: what scoring can use without a NaN or a mislabelled column."""
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    norm = m["normalize"]
    return (sorted(m["tags"]) == sorted(TAGS) and isinstance(m["size"], int) and 32 <= m["size"] <= 1024
            and real(m["dropout"]) and 0 <= m["dropout"] < 1
            and all(real(v) and 0 <= v <= 1 for v in norm["mean"]) and all(real(v) and 0 < v <= 1 for v in norm["std"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_model_json_is_accepted_exactly_when_it_is_usable(export, meta, tmp_path, data):
    m = data.draw(model_json(meta))
    if not (export.parent / "gen").is_dir():
        shutil.copytree(export, export.parent / "gen")
    (export.parent / "gen" / "model.json").write_text(json.dumps(m))
    try:
        loaded = load_export(export.parent / "gen")
    except ExportError as e:
        assert not acceptable(m), f"a usable model.json was refused: {e}"
        assert str(e).startswith(f"{export.parent / 'gen' / 'model.json'}: ")
        return
    assert acceptable(m), f"accepted: {m}"
    assert [loaded.tags[i] for i in loaded.to_tags] == list(TAGS)


def test_the_tags_order_names_the_outputs(tmp_path):
    """An export whose tags list two tags the other way round, with its outputs swapped to match, is the same
    model: `to_tags` puts both into TAGS order alike."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAGS)).eval()
    i, j = TAGS.index("clear"), TAGS.index("water")
    state = model.state_dict()
    perm = torch.arange(len(TAGS))
    perm[[i, j]] = perm[[j, i]]
    state["1.8.weight"], state["1.8.bias"] = state["1.8.weight"][perm], state["1.8.bias"][perm]
    thresholds = np.linspace(0.1, 0.5, len(TAGS))
    meta = ExportMeta(arch="resnet18", tags=TAGS, size=32, normalize=normalization("resnet18"), threshold=0.2,
                      thresholds=thresholds)
    plain = load_export(save_export(tmp_path / "a", model.state_dict(), meta))
    other = load_export(save_export(tmp_path / "b", state, replace(meta, tags=tuple(swapped(TAGS, i, j)),
                                                                   thresholds=thresholds[perm.numpy()])))
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        a, b = (m.build()(x)[:, m.to_tags] for m in (plain, other))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, other.build()(x))  # unmapped, the columns of clear and water differ
    np.testing.assert_allclose(np.asarray(other.thresholds)[other.to_tags], thresholds)
