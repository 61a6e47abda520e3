"""TrainState and the epoch schedule, without Ray: what a checkpoint holds, and where a resumed run goes on."""

import numpy as np
import pytest
import torch

from planet_batch.config import Stage
from planet_batch.training.state import (
    UNREADABLE,
    History,
    Position,
    TrainState,
    load_stage_weights,
    next_position,
    schedule,
)

STAGES = (Stage(name="a", size=32, epochs=2, frozen=True, lr=0.01),
          Stage(name="b", size=48, epochs=1, frozen=False, lr=0.001),
          Stage(name="c", size=48, epochs=3, frozen=False, lr=0.001))


def state(stage_end: bool = True) -> TrainState:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    probs = np.random.default_rng(0).random((5, 17)).astype(np.float32)
    return TrainState(model.state_dict(), opt.state_dict(), sched.state_dict(), Position(1, 0),
                      History([{"stage": "b", "epoch": 0, "fbeta": 0.5}], [0.7, 0.6], [("a", 1)]),
                      {"a": {"w": torch.zeros(2)}}, {"arch": "resnet18"},
                      probs if stage_end else None, (probs > 0.5).astype(np.float32) if stage_end else None)


def test_every_position_of_the_config_once_in_order_from_any_start():
    every = schedule(STAGES, Position(0, 0))
    assert [(p.stage, p.epoch) for p in every] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert schedule(STAGES, Position(2, 1)) == [Position(2, 1), Position(2, 2)]
    assert schedule(STAGES, Position(3, 0)) == []  # past the last stage: nothing left
    walked, pos = [], Position(0, 0)
    while pos.stage < len(STAGES):
        walked.append(pos)
        pos = next_position(STAGES, pos)
    assert walked == every and pos == Position(3, 0)


@pytest.mark.parametrize("stage_end", [True, False])
def test_a_state_saved_loads_back_field_for_field_weights_only(tmp_path, stage_end):
    saved = state(stage_end)
    path = saved.save(tmp_path)
    torch.load(path, weights_only=True)  # tensors and plain data alone
    back = TrainState.load(tmp_path)
    assert back.done == saved.done and back.history == saved.history and back.config == saved.config
    assert back.stage_end is stage_end and back.history.epochs_of("a") == [1]
    torch.testing.assert_close(back.model, saved.model)
    torch.testing.assert_close(back.kept, saved.kept)
    assert back.optimizer["state"][0]["step"] == saved.optimizer["state"][0]["step"]
    assert back.scheduler == saved.scheduler
    if stage_end:
        np.testing.assert_array_equal(back.valid_probs, saved.valid_probs)
        np.testing.assert_array_equal(back.valid_targets, saved.valid_targets)
    else:
        assert back.valid_probs is None and back.valid_targets is None


@pytest.mark.parametrize("damage", ["cut", "empty", "flipped", "missing", "other"])
def test_a_damaged_state_raises_one_of_the_unreadable_errors(tmp_path, damage):
    path = state().save(tmp_path)
    data = path.read_bytes()
    if damage == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped":
        path.write_bytes(data[:64] + bytes([data[64] ^ 0xFF]) + data[65:])
    elif damage == "missing":
        path.unlink()
    else:
        torch.save({"model": {}}, path)  # a torch file of another layout
    with pytest.raises(UNREADABLE):
        TrainState.load(tmp_path)


def test_a_stage_file_holds_the_stage_weights_and_what_it_resumed_after(tmp_path):
    from planet_batch.config import TrainConfig

    cfg = TrainConfig(arch="resnet18", stages=STAGES)
    saved = state()
    path = saved.save_stage(tmp_path, cfg)
    assert path == tmp_path / "stages" / "b.pt"
    torch.testing.assert_close(load_stage_weights(path), saved.model)
    meta = torch.load(path, weights_only=True)
    assert (meta["stage"], meta["size"], meta["resumed_after"]) == ("b", 48, [])
    assert meta["metrics"] == saved.history.epochs[-1]
