"""The model side of planet-batch on this machine's accelerator, without Ray: one prepared script for a GPU machine.

    PYTHONPATH=. python bench/gpu_check.py [--chips ../shared/data/planet_sample/train-jpg] [--out gpu_check.json]
    python bench/gpu_check.py --tiny        # seconds on a CPU (planet-batch installed): the test suite runs this

It needs what a bare GPU machine has (torch, torchvision, timm, numpy, pillow) and pydantic for planet_batch's configs:
carry its wheels in the tree (`pip download pydantic -d wheels/` here, `pip install --no-index wheels/*` there).
On cuda when there is one, else on the CPU, it measures:
  decode     real chips (4-component JPEGs) decoded per second on one core, as scoring's read tasks do (Pillow,
             convert("RGB")) at 128 and 256 px; and on the GPU with torchvision's decode_jpeg, or why it cannot
  forward    images/s at batch 256 (--batch) for each body at 128 and 256 px: fp32, bf16 autocast, bf16 compiled
             (and how long the compile took)
  predictor  scoring's actor (Predictor.__call__) on decoded uint8 batches against the pure bf16 forward of the
             same batches, without and with TTA (8 views): the host path's share (goal >= 0.9)
  train      training images/s (forward, backward, AdamW; bf16 autocast) of the first body at 128 px
A table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import decode_image, to_model_input
from planet_batch.export import ExportMeta, save_export
from planet_batch.model import build_model, inference, normalization
from planet_batch.scoring.predictor import Predictor, load_ensemble

BODIES = ("resnet34", "resnet50", "timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite2")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step, items: int, seconds: float, device: torch.device) -> float:
    """Items per second of `step()` (each call does `items`), after one warm-up call."""
    step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += items
    sync(device)
    return n / (time.perf_counter() - t0)


def chips(folder: str | None, n: int) -> list[bytes]:
    """Real chips' bytes, or (no folder) 4-component JPEGs of noise like them: Planet's are CMYK JPEGs."""
    if folder:
        files = sorted(Path(folder).glob("*.jpg"))[:n]
        if files:
            return [f.read_bytes() for f in files]
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 4), dtype=np.uint8), "CMYK").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decoding(data: list[bytes], size: int):
    """A step that decodes the next chip, as scoring's read tasks do."""
    chips = iter(range(10**12))
    return lambda: decode_image(data[next(chips) % len(data)], size)


def decode_rates(data: list[bytes], sizes: list[int], seconds: float, device: torch.device) -> dict:
    """Decodes per second on one core (Pillow releases no GIL-free parallelism here: one process, one core)."""
    out = {"components": len(Image.open(io.BytesIO(data[0])).getbands())}
    for size in sizes:
        out[f"cpu_per_core_{size}"] = rate(decoding(data, size), 1, seconds, torch.device("cpu"))
    if device.type == "cuda":
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            out["gpu"] = rate(lambda: decode_jpeg(tensors, device=device), len(tensors), seconds, device)
        except RuntimeError as e:  # nvJPEG and 4-component (CMYK/YCCK) JPEGs
            out["gpu"] = f"unsupported: {str(e).splitlines()[0][:160]}"
    return out


def forward_rates(arch: str, size: int, batch: int, seconds: float, device: torch.device, compile: bool) -> dict:
    model = build_model(arch, len(TAGS), weights="none").to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
    x = to_model_input(images, device, normalization(arch))
    out = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        with inference(device, precision):
            out[name] = rate(lambda: model(x).float().cpu(), batch, seconds, device)
    if compile:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        with inference(device, "bf16"):
            compiled(x).float().cpu()
            out["compile_s"] = time.perf_counter() - t0
            out["bf16_compiled"] = rate(lambda: compiled(x).float().cpu(), batch, seconds, device)
    return out


def predictor_share(arch: str, size: int, batch: int, seconds: float, device: torch.device, folder: Path) -> dict:
    """Scoring's actor on decoded batches, against the pure bf16 forward of the same images already on the device."""
    torch.manual_seed(0)
    state = build_model(arch, len(TAGS), weights="none").state_dict()
    save_export(folder, state, ExportMeta(arch=arch, tags=TAGS, size=size, normalize=normalization(arch),
                                          threshold=0.2, thresholds=(0.2,) * len(TAGS)))
    ensemble = load_ensemble([str(folder)])
    images = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    decoded = {"image": images, "ok": np.ones(batch, bool), "path": np.asarray([f"/x/{i}.jpg" for i in range(batch)],
               dtype=object), "name": np.asarray([str(i) for i in range(batch)], dtype=object),
               "error": np.asarray([""] * batch, dtype=object)}
    on_device = torch.from_numpy(images).to(device)
    out = {}
    for tta in (False, True):
        actor = Predictor(ensemble, [state], threads=torch.get_num_threads(), tta=tta, precision="bf16",
                          batch_size=batch)
        key = "tta" if tta else "plain"
        out[f"{key}_actor"] = rate(partial(actor, decoded), batch, seconds, device)
        out[f"{key}_forward"] = rate(partial(forward, actor.models[0][1], on_device, 8 if tta else 1, device,
                                             ensemble.members[0].normalize), batch, seconds, device)
        out[f"{key}_share"] = out[f"{key}_actor"] / out[f"{key}_forward"]
    return out


def forward(model, images: torch.Tensor, views: int, device: torch.device, norm) -> None:
    """The pure bf16 forward of `views` passes over images already on the device, waited for."""
    with inference(device, "bf16"):
        for _ in range(views):
            model(to_model_input(images, device, norm)).float().cpu()


def train_rate(arch: str, size: int, batch: int, seconds: float, device: torch.device) -> float:
    model = build_model(arch, len(TAGS), weights="none").to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = to_model_input(torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device), device,
                       normalization(arch))
    y = torch.randint(0, 2, (batch, len(TAGS)), device=device).float()

    def step():
        with torch.autocast(device.type, torch.bfloat16):
            logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return rate(step, batch, seconds, device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chips", help="a folder of real chips (default: planet_sample's, if PLANET_SHARED_DATA is set)")
    p.add_argument("--bodies", nargs="+", default=list(BODIES))
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="resnet18 at 32 px, batch 4, no compile: a CPU smoke test")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.bodies, args.sizes, args.batch, args.seconds, args.no_compile = ["resnet18"], [32], 4, 0.2, True
    if args.chips is None:
        shared = os.environ.get("PLANET_SHARED_DATA")
        args.chips = str(Path(shared) / "planet_sample" / "train-jpg") if shared else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    data = chips(args.chips, 8 if args.tiny else 200)
    result = {"device": card, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "decode": decode_rates(data, args.sizes, args.seconds, device)}
    result["decode"]["real_chips"] = bool(args.chips and Path(args.chips).is_dir())
    print(f"{'what':<44}{'value':>12}")
    for k, v in result["decode"].items():
        print(f"{'decode ' + k:<44}{str(v) if isinstance(v, str | bool | int) else f'{v:,.0f}/s':>12}")
    result["forward"] = {}
    for arch in args.bodies:
        for size in args.sizes:
            r = forward_rates(arch, size, args.batch, args.seconds, device, not args.no_compile)
            result["forward"][f"{arch}@{size}"] = r
            for k, v in r.items():
                print(f"{f'forward {arch}@{size} {k}':<44}{(f'{v:.1f} s' if k == 'compile_s' else f'{v:,.0f}/s'):>12}")
    with tempfile.TemporaryDirectory() as d:
        result["predictor"] = predictor_share(args.bodies[0], args.sizes[0], args.batch, args.seconds, device,
                                              Path(d) / "export")
    for k, v in result["predictor"].items():
        print(f"{f'predictor {args.bodies[0]}@{args.sizes[0]} {k}':<44}"
              f"{(f'{v:.2f}' if k.endswith('share') else f'{v:,.0f}/s'):>12}")
    result["train"] = {f"{args.bodies[0]}@{args.sizes[0]}": train_rate(args.bodies[0], args.sizes[0], args.batch,
                                                                        args.seconds, device)}
    print(f"{f'train {args.bodies[0]}@{args.sizes[0]} bf16':<44}"
          f"{next(iter(result['train'].values())):>10,.0f}/s")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
