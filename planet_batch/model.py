"""A torchvision or timm body + fastai head, layer groups, freezing and discriminative learning rates."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from planet_batch.config import TORCHVISION_ARCHS
from planet_batch.data.transforms import Normalization, dihedral, to_model_input
from planet_batch.errors import first_line
from planet_batch.weights import (
    WeightsError,
    timm_model,
    timm_name,
    timm_pretrained_cfg,
    torchvision_resnet,
)

log = logging.getLogger(__name__)

# CPU features that run bf16 matrix products natively: AVX-512 BF16 (Zen 4 and later EPYCs, Cooper Lake)
# and AMX (Sapphire Rapids and later Xeons). Without them bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class AdaptiveConcatPool2d(nn.Module):
    """fastai's pooling: average and max side by side, twice the features of either alone."""

    def __init__(self):
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)

    def forward(self, x):
        return torch.cat([self.max(x), self.avg(x)], dim=1)


def create_head(n_features: int, n_out: int, dropout: float = 0.5) -> nn.Sequential:
    """fastai's `create_head`: pool, BN, dropout(p/2), 512, ReLU, BN, dropout(p), n_out."""
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(dropout / 2),
        nn.Linear(2 * n_features, 512),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(dropout),
        nn.Linear(512, n_out),
    )


class TimmBody(nn.Module):
    """fastai's TimmBody: a timm model (created with `num_classes=0`) as images -> feature map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def build_body(arch: str, weights: str = "none") -> tuple[nn.Module, int]:
    """The body for `arch` (resnet18|34|50: torchvision's; timm/NAME: timm's) and its number of output features."""
    name = timm_name(arch)
    if name is not None:
        net = timm_model(name, weights)
        return TimmBody(net), net.num_features
    if arch not in TORCHVISION_ARCHS:
        raise WeightsError(f"arch: unknown {arch!r}: {', '.join(TORCHVISION_ARCHS)} or timm/NAME")
    net = torchvision_resnet(arch, weights)
    return nn.Sequential(*list(net.children())[:-2]), net.fc.in_features


def build_model(arch: str, n_out: int, weights: str = "none", dropout: float = 0.5) -> nn.Sequential:
    """`vision_learner`'s model: the body without its pool and classifier, then the fastai head."""
    body, n_features = build_body(arch, weights)
    model = nn.Sequential(body, create_head(n_features, n_out, dropout))
    for m in model[1].modules():  # fastai initialises the head with kaiming_normal
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model.to(memory_format=torch.channels_last)


def normalization(arch: str) -> Normalization:
    """From the body's pretrained config: torchvision's weights' transforms, or timm's pretrained_cfg (Lite0's
    TensorFlow-trained weights expect 0.5/0.5, not ImageNet's statistics). Used with `weights: none` too, so a
    model's input is the same whatever its start."""
    name = timm_name(arch)
    if name is not None:
        cfg = timm_pretrained_cfg(name)
        if cfg is None:  # a timm architecture without pretrained configs: timm's own default
            from timm.data import IMAGENET_DEFAULT_MEAN as mean
            from timm.data import IMAGENET_DEFAULT_STD as std
        else:
            mean, std = cfg.mean, cfg.std
    else:
        import torchvision

        preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        mean, std = preset.mean, preset.std
    return Normalization(tuple(map(float, mean)), tuple(map(float, std)))


def layer_groups(model: nn.Sequential) -> list[nn.Module]:
    """fastai's splits: a ResNet as stem to layer2, layer3 to layer4, head; a timm body as body, head (fastai's
    `default_split`, what `vision_learner` uses for every timm model)."""
    body, head = model[0], model[1]
    if isinstance(body, TimmBody):
        return [body, head]
    return [body[:6], body[6:], head]


def set_frozen(model: nn.Sequential, frozen: bool) -> None:
    """Frozen: body weights fixed except BatchNorm, which fastai keeps training (train_bn=True)."""
    for group in layer_groups(model)[:-1]:
        for m in group.modules():
            train = not frozen or isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False):
                p.requires_grad_(train)
    for p in layer_groups(model)[-1].parameters():
        p.requires_grad_(True)


def group_lrs(lr: float | tuple[float, float], n_groups: int) -> list[float]:
    """`lr` -> the head gets lr, the body lr/10; `(lo, hi)` -> geometric from lo to hi (fastai's slice)."""
    if isinstance(lr, (int, float)):
        return [lr / 10] * (n_groups - 1) + [lr]
    lo, hi = lr
    return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]


def param_groups(model: nn.Sequential, lr: float | tuple[float, float]) -> list[dict]:
    groups = layer_groups(model)
    return [{"params": list(g.parameters()), "lr": v} for g, v in zip(groups, group_lrs(lr, len(groups)))]


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """fastai's fit_one_cycle: warm-up 30% from the peak / 25, cosine down to the peak / 2.5e5 (torch divides the
    start by final_div_factor; fastai ends at the peak / 1e5), beta1 0.95 -> 0.85 -> 0.95."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=max(1, total_steps),
        pct_start=0.3,
        div_factor=25.0,
        final_div_factor=1e4,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=0.85,
        max_momentum=0.95,
    )


@dataclass(frozen=True)
class TrainingSetup:
    """What trains a model besides the model: the optimiser, the loss and (for fit_one_cycle) the schedule."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scheduler: torch.optim.lr_scheduler.OneCycleLR | None


def training_setup(model: nn.Sequential, lr: float | tuple[float, float], weight_decay: float,
                   total_steps: int | None = None) -> TrainingSetup:
    """fastai's Learner for this task: AdamW over the three layer groups, BCE on logits (multi-label), and
    with `total_steps` fit_one_cycle's schedule. Training, lr_find and the training bench all start here.

    PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8, decay on every parameter): fastai's own Adam
    settings measured side by side on the real chips were mixed, so nothing here departs from them.
    """
    optimizer = torch.optim.AdamW(param_groups(model, lr), weight_decay=weight_decay)
    scheduler = one_cycle(optimizer, total_steps) if total_steps is not None else None
    return TrainingSetup(optimizer, nn.BCEWithLogitsLoss(), scheduler)


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """This machine's CPU feature flags (Linux; empty elsewhere), read once."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(requested: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """"fp32" or "bf16" for `requested` (auto | fp32 | bf16): auto is bf16 where the hardware computes it natively
    (a CUDA device with bf16, a CPU with AVX-512 BF16 or AMX), fp32 elsewhere."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "fp32"


@contextlib.contextmanager
def inference(device: torch.device, precision: str | None = None) -> Iterator[None]:
    """How the model predicts, in validation and in scoring: no autograd, and bf16 autocast with
    precision "bf16" (default: on a GPU)."""
    bf16 = device.type == "cuda" if precision is None else precision == "bf16"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        yield


def logits(model: nn.Module, images, device: torch.device, norm: Normalization) -> torch.Tensor:
    """The model's fp32 logits for a batch of uint8 HWC images (an array or a tensor), normalised `norm`'s way:
    the one forward pass of validation, out-of-fold prediction and scoring."""
    return model(to_model_input(images, device, norm)).float()


TTA_VIEWS = range(8)  # the 8 dihedral views training augments with (flips and quarter turns)


def mean_probs(model: nn.Module, images, device: torch.device, norm: Normalization,
               views: Iterable[int] = TTA_VIEWS) -> torch.Tensor:
    """The model's sigmoid probabilities averaged over dihedral `views` of a batch: test-time augmentation, as
    scoring's `--tta` and validation's `valid_tta` predict."""
    views, x = list(views), torch.as_tensor(images)  # (views of a tensor: numpy's have negative strides)
    return sum(torch.sigmoid(logits(model, dihedral(x, k), device, norm)) for k in views) / len(views)


def predict_batches(model: nn.Module, batches: Iterable[dict], device: torch.device, norm: Normalization,
                    precision: str | None, tta: bool = False) -> Iterator[tuple[dict, torch.Tensor]]:
    """Each batch (its "image" uint8 HWC) with the model's logits, the model in eval mode under `inference`; the
    caller reads each pair inside that context. With `tta`, the logits of the mean probability of the 8 views."""
    model.eval()
    with inference(device, precision):
        for batch in batches:
            images = batch["image"]
            yield batch, (torch.logit(mean_probs(model, images, device, norm), eps=1e-6) if tta
                          else logits(model, images, device, norm))


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` is `torch.compile`'s wrapper (what `compile_or_eager` returns when compiling worked).

    torch 2.14 exports no public name for the wrapper type; this is the one place that names the private one."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def compile_or_eager(model: nn.Module, warm_up: Callable[[nn.Module], object]) -> nn.Module:
    """`torch.compile(model)`, compiled now by `warm_up(compiled)` (a call on the shapes it will see), or the model
    itself with one warning line when compiling fails: a compile problem never stops a job."""
    try:
        compiled = torch.compile(model)
        warm_up(compiled)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure (Dynamo, Inductor, a missing C compiler)
        log.warning("torch.compile failed (%s: %s); running eager", type(e).__name__, first_line(e))
        return model
