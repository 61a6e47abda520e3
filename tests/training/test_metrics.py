import numpy as np
import pytest

from planet_batch.training.metrics import accuracy_thresh, best_constant_fbeta, fbeta, tune_thresholds


def sk_f2(pred, true):
    """Kaggle's definition written out per image: F2 of the predicted and true tag sets."""
    out = []
    for p, t in zip(pred, true):
        tp = (p & t).sum()
        prec = tp / p.sum() if p.sum() else 0.0
        rec = tp / t.sum() if t.sum() else 0.0
        out.append(5 * prec * rec / (4 * prec + rec) if prec + rec else 0.0)
    return float(np.mean(out))


def test_fbeta_matches_the_kaggle_definition():
    rng = np.random.default_rng(0)
    probs = rng.random((200, 17))
    targets = (rng.random((200, 17)) < 0.2).astype(np.float32)
    targets[:, 12] = 1  # every image has a tag
    assert fbeta(probs, targets, 0.2) == pytest.approx(sk_f2(probs > 0.2, targets > 0.5), abs=1e-6)
    assert fbeta(targets, targets, 0.5) == pytest.approx(1.0, abs=1e-6)


def test_accuracy_thresh():
    probs = np.array([[0.9, 0.1], [0.3, 0.1]])
    targets = np.array([[1, 0], [0, 0]])
    assert accuracy_thresh(probs, targets, 0.2) == 0.75


def test_tuned_thresholds_beat_a_global_one_on_miscalibrated_probs():
    rng = np.random.default_rng(1)
    targets = (rng.random((500, 17)) < 0.3).astype(np.float32)
    # Class-dependent miscalibration: each class's scores live around a different level.
    shift = np.linspace(0.05, 0.6, 17)
    probs = np.clip(shift + 0.3 * targets + 0.05 * rng.standard_normal((500, 17)), 0, 1)
    thr = tune_thresholds(probs, targets)
    assert thr.shape == (17,)
    assert fbeta(probs, targets, thr) > fbeta(probs, targets, 0.2) + 0.05


def test_best_constant_is_what_a_constant_predictor_scores():
    targets = np.zeros((4, 17))
    targets[:, 12] = 1
    targets[:2, 5] = 1
    const = best_constant_fbeta(targets)
    only_primary = np.zeros((4, 17))
    only_primary[:, 12] = 1
    assert const >= fbeta(only_primary, targets, 0.5)
    assert const == pytest.approx(max(fbeta(only_primary, targets, 0.5),
                                      fbeta(np.tile(targets[0], (4, 1)), targets, 0.5)))
