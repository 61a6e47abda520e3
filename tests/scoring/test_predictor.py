"""The model side of scoring without Ray: the predictor actor's batches against a plain loop (with TTA, an
ensemble, unreadable rows, exports whose tags come in another order), which exports may score together, and how
the actors run on each device."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import plain_probs, tiny_export

from planet_batch.config import ScoreConfig
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import Normalization, decode_batch
from planet_batch.export import load_export, save_ensemble, save_export
from planet_batch.model import resolve_precision
from planet_batch.scoring import ScoreError
from planet_batch.scoring.predictor import Predictor, actor_gpus, actor_mode, load_ensemble

SIZE = 32


@pytest.fixture(scope="module")
def chips(demo_root):
    return sorted((demo_root / "test-jpg").glob("*.jpg"))[:6]


def predictor(paths, tta=False, **kw) -> Predictor:
    """The actor as Ray Data builds it, its weights given directly instead of through the object store."""
    ensemble = load_ensemble([str(p) for p in paths])
    return Predictor(ensemble, [m.load_state() for m in ensemble.members], threads=1, tta=tta, precision="fp32",
                     **kw)


def batch(chips, broken=()):
    data = [b"not a jpeg" if i in broken else p.read_bytes() for i, p in enumerate(chips)]
    return decode_batch({"bytes": data, "path": [str(p) for p in chips]}, SIZE, keep_bad=True)


def probs(out) -> np.ndarray:
    return np.column_stack([out[t] for t in TAGS])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export") / "export", SIZE)


@pytest.mark.parametrize("tta", [False, True])
def test_a_batch_scores_as_the_plain_loop_and_unreadable_rows_are_zeros(export, chips, tta):
    out = predictor([export], tta)(batch(chips, broken={2}))
    expected = plain_probs(export, chips, SIZE, tta=tta)
    got = probs(out)
    np.testing.assert_allclose(np.delete(got, 2, 0), np.delete(expected, 2, 0), atol=1e-5)
    assert not got[2].any() and out["ok"].tolist() == [True, True, False, True, True, True]
    assert out["error"][2] and list(out["image_name"]) == [p.stem for p in chips]


def test_an_export_with_its_tags_in_another_order_scores_the_same_alone_and_in_an_ensemble(export, chips, tmp_path):
    plain = load_export(export)
    perm = np.arange(len(TAGS))
    perm[[TAGS.index("clear"), TAGS.index("primary")]] = perm[[TAGS.index("primary"), TAGS.index("clear")]]
    state = plain.load_state()
    state["1.8.weight"], state["1.8.bias"] = state["1.8.weight"][perm], state["1.8.bias"][perm]
    swapped = save_export(tmp_path / "swapped", state, replace(plain, tags=tuple(np.asarray(TAGS)[perm]),
                                                               thresholds=np.linspace(0.1, 0.5, len(TAGS))[perm]))
    want = probs(predictor([export])(batch(chips)))
    for paths in ([swapped], [export, swapped]):
        np.testing.assert_allclose(probs(predictor(paths)(batch(chips))), want, atol=1e-6)
    # each --model's thresholds into TAGS order too
    np.testing.assert_allclose(load_ensemble([str(swapped)]).thresholds, np.linspace(0.1, 0.5, len(TAGS)), atol=1e-4)


def test_an_ensemble_averages_its_members_each_normalised_its_own_way(export, chips, tmp_path):
    torch.manual_seed(1)
    other = tiny_export(tmp_path / "other", SIZE)  # another seed, other weights; and another body's statistics
    save_export(other, load_export(other).load_state(), replace(
        load_export(other), normalize=Normalization((0.5,) * 3, (0.5,) * 3), thresholds=np.linspace(0.3, 0.1, 17)))
    single = [probs(predictor([p])(batch(chips))) for p in (export, other)]
    np.testing.assert_allclose(single[1], plain_probs(other, chips, SIZE), atol=1e-5)
    both = probs(predictor([export, other])(batch(chips)))
    assert not np.allclose(single[0], single[1], atol=1e-3)
    np.testing.assert_allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(load_ensemble([str(export), str(other)]).thresholds,
                               (0.2 + np.linspace(0.3, 0.1, 17)) / 2, atol=1e-4)  # each --model's tuned, averaged


def test_a_fold_ensemble_counts_as_its_members_with_its_own_thresholds(tmp_path):
    for i in range(2):
        tiny_export(tmp_path / f"fold-{i}" / "export", SIZE)
    oof = np.linspace(0.3, 0.1, len(TAGS))
    save_ensemble(tmp_path / "export", ["fold-0/export", "fold-1/export"], threshold=0.2, thresholds=oof,
                  config={}, metrics={}, tracking_run="parent")
    ensemble = load_ensemble([str(tmp_path / "export")])
    assert len(ensemble.members) == 2 and ensemble.runs == ("parent",)
    np.testing.assert_allclose(ensemble.thresholds, oof, atol=1e-4)


def test_exports_of_other_input_sizes_do_not_score_together(export, tmp_path):
    big = tiny_export(tmp_path / "big", 64)
    with pytest.raises(ScoreError, match=rf"^--model {big} takes 64px images, --model {export} {SIZE}px: an "
                                         "ensemble decodes each image once, at one size$"):
        load_ensemble([str(export), str(big)])


# ----------------------------------------------------------------------------------------------
# How the actors run: GPUs, batch size, precision and compile by device and images per actor


def score_cfg(**kw) -> ScoreConfig:
    return ScoreConfig(model=("m",), images="i", **kw)


def test_gpus_per_actor_auto_takes_the_clusters_gpus_and_a_number_as_given():
    assert actor_gpus("auto", {"CPU": 16.0, "GPU": 8.0}) == 1.0
    assert actor_gpus("auto", {"CPU": 2.0}) == 0.0 and actor_gpus("auto", {"CPU": 2.0, "GPU": 0.0}) == 0.0
    assert actor_gpus("0.5", {"CPU": 2.0, "GPU": 1.0}) == 0.5 and actor_gpus("0", {"GPU": 8.0}) == 0.0
    assert actor_gpus("auto", None) is None and actor_gpus("1", None) == 1.0  # before Ray starts
    assert score_cfg().gpus_per_actor == "auto" and score_cfg(gpus_per_actor=1).gpus_per_actor == "1"


def test_lesson3_scores_a_gpu_trained_model_on_the_clusters_gpus(tmp_path):
    from planet_batch.config import TrainConfig
    from planet_batch.lesson3 import scoring_config

    train = TrainConfig(arch="resnet18", gpu=True, workers=2, stages=(
        {"name": "s", "size": 32, "epochs": 1, "frozen": False, "lr": 0.01},))
    cfg = scoring_config(train, "data", tmp_path, threshold="tuned")
    assert actor_gpus(cfg.gpus_per_actor, {"CPU": 32.0, "GPU": 4.0}) == 1.0  # a GPU cluster: on its GPUs
    assert actor_gpus(cfg.gpus_per_actor, {"CPU": 2.0}) == 0.0  # a CPU-only one as before
    assert (cfg.model, cfg.threshold) == ((str(tmp_path / "export"),), "tuned")


@pytest.mark.parametrize("gpus, images, compiled", [
    (0.0, 20_000, False), (0.0, 40_000, True),  # CPU: pays after ~28k images an actor
    (1.0, 61_191, False), (1.0, 5_000_000, True),  # GPU: the Kaggle test set stays eager
])
def test_compile_auto_compiles_where_it_pays_back_on_that_device(gpus, images, compiled):
    assert actor_mode(score_cfg(compile="auto"), gpus, images).compile is compiled
    assert actor_mode(score_cfg(compile="on"), gpus, 1).compile and not actor_mode(score_cfg(compile="off"), gpus,
                                                                                  10**9).compile


def test_batch_size_and_precision_by_device():
    assert actor_mode(score_cfg(), 0.0, 1).batch_size == 64 and actor_mode(score_cfg(), 1.0, 1).batch_size == 256
    assert actor_mode(score_cfg(batch_size=32), 1.0, 1).batch_size == 32
    assert actor_mode(score_cfg(precision="fp32"), 1.0, 1).precision == "fp32"
    assert actor_mode(score_cfg(), None, 1).precision == "auto"  # --gpus-per-actor auto before Ray: unknown
    if not torch.cuda.is_available():
        assert actor_mode(score_cfg(), 1.0, 1).precision == "auto"  # each GPU actor resolves it on its GPU
    assert actor_mode(score_cfg(), 0.0, 1).precision == resolve_precision("auto", torch.device("cpu"))


def test_a_read_only_batch_is_uploaded_without_a_warning():
    """Ray Data hands an actor a batch that is one whole block straight from the object store, read-only; torch's
    warning about it reached the console (make demo) though the batch is never written."""
    import types
    import warnings

    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = Predictor.upload(types.SimpleNamespace(pinned=None), images)
    assert x.shape == (2, 4, 4, 3)
