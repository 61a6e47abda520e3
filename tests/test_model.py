import pytest
import torch
import torchvision
from torch import nn

from planet_batch.model import (
    WeightsError,
    build_model,
    group_lrs,
    layer_groups,
    one_cycle,
    param_groups,
    set_frozen,
    torchvision_resnet,
)


def test_head_is_fastais():
    model = build_model("resnet18", 17)
    head = model[1]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d",
                     "Dropout", "Linear"]
    assert head[4].in_features == 1024 and head[4].out_features == 512 and head[8].out_features == 17
    assert head[3].p == 0.25 and head[7].p == 0.5
    model.eval()
    x = torch.zeros(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 17)


def test_frozen_trains_only_head_and_batchnorm():
    model = build_model("resnet18", 17)
    set_frozen(model, True)
    body = model[0]
    assert not body[0].weight.requires_grad  # conv1
    assert body[1].weight.requires_grad  # bn1 keeps training, as fastai's train_bn
    assert all(p.requires_grad for p in model[1].parameters())
    set_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_layer_groups_cover_every_parameter_once():
    model = build_model("resnet34", 17)
    ids = [id(p) for g in layer_groups(model) for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_discriminative_lrs():
    assert group_lrs(0.01) == pytest.approx([0.001, 0.001, 0.01])
    assert group_lrs((1e-5, 1e-3)) == pytest.approx([1e-5, 1e-4, 1e-3])


def test_one_cycle_per_group_with_beta_cycling():
    model = build_model("resnet18", 17)
    opt = torch.optim.AdamW(param_groups(model, (1e-5, 1e-3)), weight_decay=1e-2)
    sched = one_cycle(opt, 100)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5 / 25, 1e-4 / 25, 1e-3 / 25])
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    for _ in range(30):
        opt.step()
        sched.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-3, rel=1e-3)  # peak after 30% warm-up
    assert opt.param_groups[2]["betas"][0] == pytest.approx(0.85, abs=1e-3)


def test_weights_from_a_file_and_from_the_torch_cache(tmp_path, monkeypatch):
    reference = torchvision.models.resnet18()
    path = tmp_path / "rn18.pth"
    torch.save(reference.state_dict(), path)
    loaded = torchvision_resnet("resnet18", str(path))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    model = build_model("resnet18", 17, weights=str(path))
    assert torch.equal(model[0][0].weight, reference.conv1.weight)

    # `imagenet` reads torchvision's cache file when it is there (no machine here can download).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = torchvision.models.ResNet18_Weights.DEFAULT
    cached = tmp_path / "torch" / "hub" / "checkpoints" / spec.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    assert torch.equal(torchvision_resnet("resnet18", "imagenet").conv1.weight, reference.conv1.weight)


def test_missing_or_wrong_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        torchvision_resnet("resnet18", str(tmp_path / "nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit resnet18"):
        torchvision_resnet("resnet18", str(wrong))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # No network here: the download fails and the message says where the file goes.
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError, match=r"Put resnet18-.*\.pth .* at .*empty/hub/checkpoints"):
        torchvision_resnet("resnet18", "imagenet")
