"""Scoring throughput: pure forward, a plain loop, and the Ray Data pipeline, measured in one run.

    python bench/score_throughput.py --n-images 2000 [--arch resnet34 --size 128] [--modes fp32/off auto/auto]
    python bench/score_throughput.py --memory 2000 20000   # driver peak RSS at two sizes
    python bench/score_throughput.py --n-images 61191 --size 256 --gpus-per-actor 1   # on a GPU node

(a) the model's forward rate on in-memory tensors (the limit on CPU); (b) a plain
single-process loop that reads, decodes, predicts and writes the CSV; (c) the Ray Data
pipeline end to end (Ray already running, as under a job) and in steady state (rows
received between 25% and 90% of the run). The last line is JSON with every figure.
Images are 256x256 4-component (CMYK) JPEGs like the real chips: 64 distinct rendered chips repeated under new
names. The forward and the plain loop run fp32 on every device (named by what ran).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from planet_batch.cluster.runtime import setup_logging
from planet_batch.config import ScoreConfig
from planet_batch.data.demo_data import render, sample_tag_sets, save_chip
from planet_batch.data.labels import TAGS, decode
from planet_batch.data.submission import write_submission
from planet_batch.data.transforms import decode_image, to_model_input
from planet_batch.export import ExportMeta, load_export, save_export
from planet_batch.model import build_model, inference, normalization


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    protos = []
    for i, tags in enumerate(sample_tag_sets(64, rng)):
        p = folder / f"proto_{i}.jpg"
        save_chip(render(tags, rng), p)
        protos.append(p)
    paths = [folder / f"test_{i}.jpg" for i in range(n)]
    for i, p in enumerate(paths):
        shutil.copyfile(protos[i % len(protos)], p)
    for p in protos:
        p.unlink()
    return paths


def make_export(folder: Path, arch: str, size: int) -> Path:
    model = build_model(arch, len(TAGS))
    return save_export(folder, model.state_dict(), ExportMeta(
        arch=arch, tags=TAGS, size=size, normalize=normalization(arch), threshold=0.2,
        thresholds=np.full(len(TAGS), 0.2)))


def forward_rate(export_dir: Path, batch: int, threads: int, device: torch.device, seconds: float = 15.0) -> float:
    torch.set_num_threads(threads)
    exp = load_export(export_dir)
    model = exp.build(device)
    x = to_model_input(np.random.default_rng(0).integers(0, 255, (batch, exp.size, exp.size, 3), dtype=np.uint8),
                       device, exp.normalize)
    with inference(device, "fp32"):
        model(x).float().cpu()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x).float().cpu()  # .cpu() waits for the GPU, as the actors' results do
            n += batch
    return n / (time.perf_counter() - t0)


def plain_loop_rate(export_dir: Path, paths: list[Path], batch: int, threads: int, device: torch.device,
                    out: Path) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    exp = load_export(export_dir)
    model = exp.build(device)
    probs = []
    with inference(device, "fp32"):
        for i in range(0, len(paths), batch):
            images = np.stack([decode_image(p.read_bytes(), exp.size, p.stem) for p in paths[i:i + batch]])
            probs.append(torch.sigmoid(model(to_model_input(images, device, exp.normalize)).float()).cpu().numpy())
    write_submission(out, [zip([p.stem for p in paths], decode(np.concatenate(probs), 0.2))])
    return len(paths) / (time.perf_counter() - t0)


def ray_rates(export_dir: Path, folder: Path, n: int, batch: int, out: Path, cpus_per_actor: float,
              gpus_per_actor: float, shard_rows: int, precision: str, compile: str) -> tuple[float, float, dict]:
    """End to end and steady-state images/s of the pipeline; steady from the shards' commit times
    (rows committed between 25% and 90% of the run)."""
    import pyarrow.parquet as pq

    from planet_batch.scoring import score

    t0 = time.perf_counter()
    # One view, as the plain loop it is compared with (TTA's 8 views have their own row in docs/performance.md).
    score.run_scoring(ScoreConfig(model=str(export_dir), images=str(folder), out=str(out), batch_size=batch,
                                  cpus_per_actor=cpus_per_actor, gpus_per_actor=str(gpus_per_actor), overwrite=True,
                                  shard_rows=shard_rows, keep_parts=True, precision=precision, compile=compile,
                                  tta=False))
    wall = time.perf_counter() - t0
    commits = [p for p in (out.parent / f"{out.name}.parts" / "commits").glob("*.parquet")]
    arrivals = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in commits)
    times = np.array([t for t, _ in arrivals])
    counts = np.cumsum([c for _, c in arrivals])
    lo, hi = np.searchsorted(counts, 0.25 * n), np.searchsorted(counts, 0.9 * n)
    steady = (counts[hi] - counts[lo]) / (times[hi] - times[lo]) if hi > lo else float("nan")
    mode = json.loads((out.parent / "score_summary.json").read_text())
    return n / wall, float(steady), {"precision": mode["precision"], "compiled": mode["compiled"]}


def peak_rss_mb(n: int, arch: str, size: int) -> float:
    """Score n images in a fresh process and return its peak RSS."""
    code = (
        "import sys, resource, tempfile, ray; from pathlib import Path; sys.argv=['x'];"
        "from bench.score_throughput import make_images, make_export;"
        "from planet_batch.scoring.score import run_scoring; from planet_batch.config import ScoreConfig;"
        f"d=Path(tempfile.mkdtemp()); make_images(d/'img', {n}); e=make_export(d/'export', '{arch}', {size});"
        "ray.init(num_cpus=2, log_to_driver=False);"
        "run_scoring(ScoreConfig(model=str(e), images=str(d/'img'), out=str(d/'s.csv'), tta=False));"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("RSS")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--forward-seconds", type=float, default=15.0, help="how long (a) runs")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cpus-per-actor", type=float, default=ScoreConfig.cpus_per_actor)
    p.add_argument("--modes", nargs="+", default=["fp32/off", "auto/auto"],
                   help="PRECISION/COMPILE pairs, one Ray Data run each, side by side (repeat one to see the noise); "
                        "the first is the reference for decision_agreement")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPU actors for (c); (a) and (b) then run on the GPU too")
    p.add_argument("--shard-rows", type=int, default=250,
                   help="rows per shard (product default 1000; smaller here so the steady window holds shards)")
    p.add_argument("--memory", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                   help="instead: driver peak RSS scoring SMALL and LARGE images (resnet18@64)")
    args = p.parse_args()
    setup_logging()
    if args.memory:
        small, large = (peak_rss_mb(n, "resnet18", 64) for n in args.memory)
        print(json.dumps({"bench": "score_driver_memory", "n_images": args.memory, "peak_rss_mb": [small, large],
                          "ratio": round(large / small, 3)}))
        return
    import ray

    device = torch.device("cuda" if args.gpus_per_actor else "cpu")
    if args.gpus_per_actor and not torch.cuda.is_available():
        raise SystemExit("--gpus-per-actor: this machine has no usable GPU")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.n_images)
        export = make_export(tmp / "export", args.arch, args.size)
        fwd = forward_rate(export, args.batch_size, args.threads, device, args.forward_seconds)
        print(f"(a) pure forward: {fwd:.1f} img/s", flush=True)
        plain = plain_loop_rate(export, paths, args.batch_size, args.threads, device, tmp / "plain.csv")
        print(f"(b) plain loop: {plain:.1f} img/s", flush=True)
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
        variants = []
        for i, m in enumerate(args.modes):
            precision, compile = m.split("/")
            out = tmp / f"ray-{i}" / "submission.csv"
            out.parent.mkdir()
            e2e, steady, mode = ray_rates(export, tmp / "images", args.n_images, args.batch_size, out,
                                          args.cpus_per_actor, args.gpus_per_actor, args.shard_rows, precision,
                                          compile)
            print(f"(c) ray data, --precision {precision} --compile {compile} ({mode}): {e2e:.1f} img/s end to end, "
                  f"{steady:.1f} img/s steady state", flush=True)
            variants.append({"mode": m, **mode, "end_to_end_img_s": round(e2e, 1), "steady_img_s": round(steady, 1),
                             "tags": [r.split(",")[1] for r in out.read_text().splitlines()[1:]]})
        e2e, steady = variants[0]["end_to_end_img_s"], variants[0]["steady_img_s"]
        same = (tmp / "plain.csv").read_text() == (tmp / "ray-0" / "submission.csv").read_text()
    auto = [v for v in variants if v["mode"].startswith("auto/")] or variants
    best = max(auto, key=lambda v: v["end_to_end_img_s"])
    pairs = [(set(a.split()), set(b.split())) for a, b in zip(variants[0]["tags"], best["tags"])]
    agreement = sum(len(a & b) + (len(TAGS) - len(a | b)) for a, b in pairs) / (len(pairs) * len(TAGS))
    for v in variants:
        del v["tags"]
    print(json.dumps({
        "bench": "score_throughput", "arch": args.arch, "size": args.size, "n_images": args.n_images,
        "batch_size": args.batch_size, "shard_rows": args.shard_rows, "threads": args.threads, "device": device.type,
        "forward_img_s": round(fwd, 1),
        "plain_loop_img_s": round(plain, 1), "ray_end_to_end_img_s": round(e2e, 1),
        "ray_steady_img_s": round(steady, 1), "steady_vs_forward": round(steady / fwd, 3),
        "end_to_end_vs_plain": round(e2e / plain, 3), "same_submission_as_plain_loop": same,
        "projected_61191_s": round(61191 / steady + (args.n_images / e2e - args.n_images / steady), 0),
        "by_mode": variants, "best_auto_mode": best["mode"],
        "best_vs_fp32_eager_forward": round(best["end_to_end_img_s"] / fwd, 3),
        "decision_agreement": round(agreement, 5),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
