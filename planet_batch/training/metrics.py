"""The Kaggle metric (per-image F2), fastai's accuracy_thresh, and per-class threshold tuning."""

from __future__ import annotations

import numpy as np

EPS = 1e-9


def _fbeta_from_counts(tp, n_pred, n_true, beta: float) -> np.ndarray:
    b2 = beta * beta
    prec = tp / (n_pred + EPS)
    rec = tp / (n_true + EPS)
    return (1 + b2) * prec * rec / (b2 * prec + rec + EPS)


def fbeta(probs: np.ndarray, targets: np.ndarray, thresh=0.2, beta: float = 2.0) -> float:
    """Mean over images of each image's F-beta (Kaggle's mean F2), as fastai's `fbeta`.

    `thresh` is one number or one per class.
    """
    pred = probs > np.asarray(thresh)
    t = targets > 0.5
    return float(_fbeta_from_counts((pred & t).sum(1), pred.sum(1), t.sum(1), beta).mean())


def accuracy_thresh(probs: np.ndarray, targets: np.ndarray, thresh: float = 0.2) -> float:
    """Fraction of (image, tag) decisions that are right at `thresh`."""
    return float(((probs > thresh) == (targets > 0.5)).mean())


def best_constant_fbeta(targets: np.ndarray, beta: float = 2.0) -> float:
    """F-beta of the best prediction that ignores the image: the tags that help most, greedily added.

    A model has learnt something only when it beats this.
    """
    t = targets > 0.5
    chosen = np.zeros(t.shape[1], dtype=bool)
    best = 0.0
    while True:
        scores = []
        for j in np.flatnonzero(~chosen):
            c = chosen.copy()
            c[j] = True
            pred = np.broadcast_to(c, t.shape)
            scores.append((_fbeta_from_counts((pred & t).sum(1), pred.sum(1), t.sum(1), beta).mean(), j))
        if not scores:
            return best
        score, j = max(scores)
        if score <= best:
            return best
        best, chosen[j] = float(score), True


def tune_thresholds(
    probs: np.ndarray, targets: np.ndarray, start: float = 0.2, beta: float = 2.0, passes: int = 2
) -> np.ndarray:
    """Per-class thresholds that maximise mean F-beta, by coordinate ascent from `start`.

    Each step moves one class's threshold over a grid while the others stay fixed;
    the other classes' contributions to every image's counts are computed once per step.
    """
    grid = np.linspace(0.01, 0.99, 99)
    t = targets > 0.5
    thr = np.full(probs.shape[1], start)
    for _ in range(passes):
        for j in range(probs.shape[1]):
            pred = probs > thr
            others = np.ones(probs.shape[1], dtype=bool)
            others[j] = False
            tp0 = (pred[:, others] & t[:, others]).sum(1)
            np0 = pred[:, others].sum(1)
            nt = t.sum(1)
            pj = probs[:, j][:, None] > grid[None, :]  # (n, grid)
            tp = tp0[:, None] + (pj & t[:, j][:, None])
            npred = np0[:, None] + pj
            scores = _fbeta_from_counts(tp, npred, nt[:, None], beta).mean(0)
            current = _fbeta_from_counts(tp0 + (pred[:, j] & t[:, j]), np0 + pred[:, j], nt, beta).mean()
            if scores.max() > current + 1e-12:
                thr[j] = grid[int(scores.argmax())]
    return thr
