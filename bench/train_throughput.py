"""Images/s of one Ray Train epoch against a plain single-process PyTorch loop.

Same generated images, model, batch size, augmentation and torch threads; both read and
decode from disk every epoch. Each side runs 2 epochs and the second (warm) one is timed.
With --repeats R the two sides alternate R times (this machine is shared and noisy) and the
medians are compared. The last line printed is JSON with every figure and the ratio.

    python bench/train_throughput.py [--n-images 512 --size 128 --arch resnet18 --threads 2 --repeats 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from planet_batch.cluster.runtime import setup_logging
from planet_batch.config import TrainConfig, load_config
from planet_batch.data.datasets import train_valid_split
from planet_batch.data.demo_data import write_demo_data
from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import augment_batch, decode_image, to_model_input
from planet_batch.export import load_export
from planet_batch.model import build_model, normalization, set_frozen, training_setup
from planet_batch.training.job import train


def plain_loop_epoch_rate(paths, targets, args) -> float:
    torch.set_num_threads(args.threads)
    model = build_model(args.arch, len(TAGS))
    set_frozen(model, False)
    steps = len(paths) // args.batch_size
    setup = training_setup(model, 0.01, 1e-2, 2 * steps)
    opt, sched, loss_fn = setup.optimizer, setup.scheduler, setup.loss_fn
    rng = np.random.default_rng(0)
    norm = normalization(args.arch)
    rate = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        order = rng.permutation(len(paths))
        for b in range(steps):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            images = np.stack([decode_image(Path(paths[i]).read_bytes(), args.size) for i in idx])
            x = to_model_input(augment_batch(images, rng), "cpu", norm)
            loss = loss_fn(model(x), torch.from_numpy(targets[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        rate = steps * args.batch_size / (time.perf_counter() - t0)
    return rate


def ray_train_epoch_rate(root, run_dir, args, precision: str = "fp32") -> float:
    import ray

    ray.init(num_cpus=args.cpus, log_to_driver=False)
    stage = {"name": "bench", "size": args.size, "epochs": 2, "frozen": False, "lr": 0.01}
    cfg = load_config(TrainConfig, None, [
        f"arch={args.arch}", "weights=none", f"batch_size={args.batch_size}", "valid_pct=0.05",
        f"workers={args.workers}", f"cpus_per_worker={args.cpus_per_worker}", f"torch_threads={args.threads}",
        f"stages=[{json.dumps(stage)}]", f"precision={precision}",
    ])
    train(cfg, root, run_dir)
    state = torch.load(Path(run_dir) / "stages" / "bench.pt", weights_only=True)
    ray.shutdown()
    assert load_export(Path(run_dir) / "export").arch == args.arch
    print(f"ray train: data wait {state['metrics']['data_wait_s']:.1f} s of the epoch", flush=True)
    return float(state["metrics"]["train_images_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times; report medians")
    p.add_argument("--precisions", nargs="+", default=["fp32"],
                   help="Ray Train runs per repeat, one per precision (fp32 first: the plain loop's mode)")
    args = p.parse_args()
    setup_logging()
    plain, ray_rates = [], {p: [] for p in args.precisions}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_data(Path(tmp) / "data", n_train=args.n_images, n_test=1, n_additional=1, seed=0)
        train, _ = train_valid_split(root, 0.05, 42)
        for r in range(args.repeats):
            plain.append(plain_loop_epoch_rate(train.paths, train.targets, args))
            print(f"[{r + 1}/{args.repeats}] plain loop: {plain[-1]:.1f} img/s", flush=True)
            for prec in args.precisions:
                ray_rates[prec].append(ray_train_epoch_rate(root, Path(tmp) / f"run{r}-{prec}", args, prec))
                print(f"[{r + 1}/{args.repeats}] ray train ({args.workers} worker(s), {prec}): "
                      f"{ray_rates[prec][-1]:.1f} img/s", flush=True)
    medians = {prec: statistics.median(v) for prec, v in ray_rates.items()}
    plain_med, ray_med = statistics.median(plain), medians[args.precisions[0]]
    print(json.dumps({
        "bench": "train_throughput", "arch": args.arch, "size": args.size, "batch_size": args.batch_size,
        "threads": args.threads, "workers": args.workers, "n_images": len(train), "repeats": args.repeats,
        "plain_img_s": round(plain_med, 2), "ray_train_img_s": round(ray_med, 2),
        "ratio": round(ray_med / plain_med, 3),
        "per_repeat": [{"plain_img_s": round(a, 2), "ray_train_img_s": round(b, 2), "ratio": round(b / a, 3)}
                       for a, b in zip(plain, ray_rates[args.precisions[0]])],
        "ray_train_img_s_by_precision": {prec: round(v, 2) for prec, v in medians.items()},
        "vs_fp32": {prec: round(v / medians["fp32"], 3) for prec, v in medians.items()} if "fp32" in medians else None,
    }))


if __name__ == "__main__":
    main()
