import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from planet_batch.data.transforms import to_model_input
from planet_batch.model import (
    build_model,
    compile_or_eager,
    cpu_flags,
    group_lrs,
    inference,
    layer_groups,
    mean_probs,
    normalization,
    one_cycle,
    param_groups,
    predict_batches,
    resolve_precision,
    set_frozen,
    training_setup,
)
from planet_batch.weights import WeightsError, torchvision_resnet


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
    assert group_lrs(0.01, 3) == pytest.approx([0.001, 0.001, 0.01])
    assert group_lrs((1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert group_lrs(0.01, 2) == pytest.approx([0.001, 0.01]) and group_lrs((1e-5, 2e-3), 2) == [1e-5, 2e-3]


LITE0 = "timm/tf_efficientnet_lite0"


@pytest.mark.parametrize("arch, groups", [("resnet18", 3), (LITE0, 2), ("timm/resnet18", 2)])
def test_each_layer_group_gets_its_learning_rate(arch, groups):
    """fastai's splits: a torchvision ResNet in three groups, any timm body as body + head (`default_split`)."""
    model = build_model(arch, 17)
    setup = training_setup(model, (1e-5, 2e-3), 1e-2, total_steps=100)
    for _ in range(29):  # the one-cycle peak, at 30% of the steps
        setup.optimizer.step()
        setup.scheduler.step()
    peaks = [g["lr"] for g in setup.optimizer.param_groups]
    assert peaks == pytest.approx(group_lrs((1e-5, 2e-3), groups), rel=1e-6) and peaks[0] == pytest.approx(1e-5)
    owned = [{id(p) for p in g["params"]} for g in setup.optimizer.param_groups]
    assert owned[-1] == {id(p) for p in model[1].parameters()}  # the head, at the highest rate
    assert set().union(*owned[:-1]) == {id(p) for p in model[0].parameters()}
    assert sum(map(len, owned)) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["resnet18", LITE0])
def test_a_frozen_epoch_moves_only_the_head_and_batchnorm(arch):
    """Tensor by tensor, through the training step itself: fastai's freeze with train_bn."""
    from planet_batch.training.steps import train_one_epoch

    torch.manual_seed(0)
    model = build_model(arch, 17)
    set_frozen(model, True)
    setup = training_setup(model, 0.01, 1e-2, total_steps=4)
    before = {k: v.clone() for k, v in model.named_parameters()}
    rng = np.random.default_rng(0)
    batches = [{"image": torch.from_numpy(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)),
                "target": torch.from_numpy((rng.random((8, 17)) < 0.3).astype(np.float32))} for _ in range(4)]
    train_one_epoch(model, iter(batches), setup, CPU, normalization(arch), "test:{batch}", "fp32")
    batchnorm = {f"{name}.{p}" for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        if name.startswith("1."):
            assert moved, f"head {name} did not train"
        elif name in batchnorm:
            assert moved, f"body BatchNorm {name} did not train (train_bn)"
        else:
            assert not moved, f"frozen body weight {name} changed"


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


CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_on_cpus_that_compute_it_natively(tmp_path):
    epyc = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
    assert resolve_precision("auto", CPU, epyc) == "bf16"
    assert resolve_precision("auto", CPU, frozenset({"avx2", "amx_bf16", "amx_tile"})) == "bf16"
    assert resolve_precision("auto", CPU, frozenset({"avx2", "avx512f"})) == "fp32"  # bf16 would be emulated
    assert resolve_precision("fp32", CPU, epyc) == "fp32" and resolve_precision("bf16", CPU, frozenset()) == "bf16"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_a_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(model, **kw):
        def run(x):
            raise RuntimeError("inductor: no C compiler\n(a long trace)")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = build_model("resnet18", 17).eval()
    x = torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert compile_or_eager(model, lambda m: m(x)) is model
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["torch.compile failed (RuntimeError: inductor: no C compiler); running eager"]


def test_bf16_inference_stays_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("resnet18", 17).eval()
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with inference(CPU, "fp32"):
        fp32 = torch.sigmoid(model(x))
    with inference(CPU, "bf16"):
        bf16 = torch.sigmoid(model(x).float())
    assert fp32.dtype == bf16.dtype == torch.float32
    assert 0 < (fp32 - bf16).abs().max() < 0.05  # bf16 really ran (8 bits of mantissa), and stayed near


class Corner(nn.Module):
    """Logits that depend on where the image is bright: each of the 8 dihedral views gives other logits."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 1, -1, 0], x[:, 2, -1, -1]], 1)


@pytest.mark.parametrize("as_array", [True, False])
def test_tta_predicts_the_mean_probability_of_the_eight_views(as_array):
    from planet_batch.data.transforms import Normalization, dihedral

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    device = torch.device("cpu")
    batch = {"image": images if as_array else torch.from_numpy(images)}  # (OOF rows: arrays; validation: tensors)
    expected = np.mean([torch.sigmoid(Corner()(to_model_input(np.ascontiguousarray(dihedral(images, k)), device,
                                                              norm))).numpy() for k in range(8)], axis=0)
    ((_, plain),) = predict_batches(Corner(), [batch], device, norm, "fp32")
    ((_, tta),) = predict_batches(Corner(), [batch], device, norm, "fp32", tta=True)
    assert np.allclose(torch.sigmoid(tta).numpy(), expected, atol=1e-5)
    assert not np.allclose(torch.sigmoid(plain).numpy(), expected, atol=1e-3)  # the views differ
    assert np.allclose(mean_probs(Corner(), batch["image"], device, norm, [0]).numpy(),
                       torch.sigmoid(plain).numpy())
