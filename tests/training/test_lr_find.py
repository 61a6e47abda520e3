import numpy as np
import pytest
import torch

from planet_batch.model import build_model
from planet_batch.training.lr_find import lr_sweep, suggest_lr


def test_suggestion_is_the_steepest_descent():
    lrs = np.logspace(-7, 1, 50)
    losses = 1.0 / (1 + np.exp((np.log10(lrs) + 2) * 3)) + 0.1  # falls fastest at 1e-2
    assert suggest_lr(lrs, losses) == pytest.approx(1e-2, rel=0.5)


def test_sweep_stops_on_divergence_and_restores_weights():
    torch.manual_seed(0)
    model = build_model("resnet18", 17)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32)
    y = (torch.rand(8, 17) < 0.3).float()
    result = lr_sweep(model, iter([(x, y)] * 100), num_it=100)
    assert result.stopped_early and len(result.lrs) < 100
    assert result.lrs[0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    # It stopped where the smoothed loss passed 4x its best, and suggests an LR from before the turn-up (the last
    # three points are left out) where the loss was falling.
    assert not np.isfinite(result.losses[-1]) or result.losses[-1] > 4 * min(result.losses[:-1])
    i = result.lrs.index(result.suggestion)
    assert i < len(result.lrs) - 3 and result.losses[i + 1] < result.losses[max(i - 1, 0)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_too_few_batches_is_a_user_error():
    from planet_batch.errors import PlanetBatchError

    model = build_model("resnet18", 17)
    with pytest.raises(PlanetBatchError, match="ran only 1 batches"):
        lr_sweep(model, iter([(torch.randn(4, 3, 32, 32), torch.zeros(4, 17))]), num_it=100)
