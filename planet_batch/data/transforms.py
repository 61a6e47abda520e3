"""The one source of truth for preprocessing: decode, augment, normalise.

Training and scoring both call these, so a model always sees at scoring time
exactly the pixels it was trained on.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Normalization:
    """The input statistics a body was pretrained with: mean and std per RGB channel of pixels in [0, 1]
    (model.normalization reads them from the body's pretrained config; an export carries them)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class DecodeError(ValueError):
    """Bytes that are not a decodable image. Carries the file name so callers can report it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot decode {name}: {reason}")
        self.name, self.reason = name, reason


def decode_image(data: bytes, size: int, name: str = "<bytes>") -> np.ndarray:
    """Image bytes to an RGB uint8 array of shape (size, size, 3).

    RGB is what Pillow's `convert("RGB")` gives, which is right for the 4-component
    (CMYK) Planet chips. `draft` lets libjpeg decode straight at 1/2, 1/4 or 1/8 scale
    (DCT scaling) while staying at least `size` on each side, so a 256 px chip wanted at
    128 px costs about a quarter of a full decode; the final resize only runs when the
    scaled decode is not exactly `size`.
    """
    if not data:
        raise DecodeError(name, "zero-length file")
    try:
        with warnings.catch_warnings():
            # An oversized image is a bad input to report, not a warning to print per batch.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format == "JPEG":
                im.draft(im.mode, (size, size))
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(name, f"{type(e).__name__}: {e}") from e


def image_name(path: str) -> str:
    """`.../test-jpg/test_12.jpg` -> `test_12` (also for s3:// paths)."""
    return PurePath(path).stem


def decode_batch(batch: dict, size: int, keep_bad: bool = False) -> dict:
    """Ray Data batch {bytes, path} -> {path, name, image (N,size,size,3) uint8, ok}.

    With keep_bad, undecodable images become all-zero rows with ok=False and the reason
    in `error` instead of failing the batch: scoring must account for every input row.
    The path passes through: it is the row's id for resumable scoring.
    """
    n = len(batch["path"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors = [""] * n
    names = [image_name(p) for p in batch["path"]]
    for i, (data, name) in enumerate(zip(batch["bytes"], names)):
        try:
            images[i] = decode_image(data, size, name)
        except DecodeError as e:
            if not keep_bad:
                raise
            ok[i], errors[i] = False, e.reason
    out = {"path": np.asarray(batch["path"], dtype=object), "name": np.asarray(names, dtype=object), "image": images,
           "ok": ok}
    if keep_bad:
        out["error"] = np.asarray(errors, dtype=object)
    return out


def dihedral(image, k: int):
    """The k-th of the 8 symmetries of the square (k in 0..7) of (..., H, W, C) images: a numpy array (a view) or a
    torch tensor (on its device: scoring's TTA turns a batch already uploaded)."""
    if isinstance(image, np.ndarray):
        out = np.rot90(image, k % 4, axes=(-3, -2))
        return out[..., ::-1, :] if k >= 4 else out
    import torch

    out = torch.rot90(image, k % 4, dims=(-3, -2))
    return torch.flip(out, dims=(-2,)) if k >= 4 else out


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    max_lighting: float = 0.1,
    max_zoom: float = 1.05,
    p_zoom: float = 0.75,
    p_lighting: float = 0.75,
) -> np.ndarray:
    """fastai's `get_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05, max_warp=0)`.

    A random dihedral view per image, a random zoom up to `max_zoom`, and fastai's
    brightness/contrast jitter (done in logit space, as fastai does, so it never clips).
    """
    n, size = images.shape[0], images.shape[1]
    out = np.empty_like(images)
    for i in range(n):
        img = dihedral(images[i], int(rng.integers(8)))
        if max_zoom > 1 and rng.random() < p_zoom:
            crop = int(round(size / rng.uniform(1.0, max_zoom)))
            if crop < size:
                y, x = rng.integers(0, size - crop + 1, size=2)
                img = np.asarray(
                    Image.fromarray(np.ascontiguousarray(img[y : y + crop, x : x + crop])).resize(
                        (size, size), Image.Resampling.BILINEAR
                    )
                )
        out[i] = img
    if max_lighting > 0:
        apply = rng.random(n) < p_lighting
        if apply.any():
            brightness = rng.uniform(0.5 * (1 - max_lighting), 0.5 * (1 + max_lighting), n)
            contrast = np.exp(rng.uniform(np.log(1 / (1 + max_lighting)), np.log(1 + max_lighting), n))
            x = out[apply].astype(np.float32) / 255.0
            x = np.clip(x, 1e-4, 1 - 1e-4)
            logit = np.log(x / (1 - x))
            b = brightness[apply, None, None, None]
            logit = (logit + np.log(b / (1 - b))) * contrast[apply, None, None, None]
            out[apply] = np.round(255.0 / (1.0 + np.exp(-logit))).astype(np.uint8)
    return out


def to_model_input(images, device, norm: Normalization):
    """uint8 NHWC batch (array or tensor) -> float NCHW tensor normalised by `norm`, in channels_last memory.

    uint8 crosses to the device (4x fewer bytes than float) and NHWC memory *is*
    channels_last, so the permute is free.
    """
    # Imported here so Ray Data's decode tasks, which never call this, start without torch.
    import torch

    x = torch.as_tensor(images).to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.float().contiguous(memory_format=torch.channels_last)
    m, s = _scale(norm, x.device)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=32)
def _scale(norm: Normalization, device):
    """`norm`'s mean and std on 0-255 pixels, on `device`: made once, not uploaded with every batch (plain tensors
    even when first asked for under inference mode: training uses them too)."""
    import torch

    with torch.inference_mode(False):
        return (torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255,
                torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255)
