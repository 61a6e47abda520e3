"""Soak: score N generated images twice, sampling the RSS of every process once a second.

    python -m bench.soak --n-images 20000

Reports, for the driver and every Ray process, the peak RSS in the first and the second half of
each run (flat memory means the second half is no higher), and whether both runs wrote the same
submission. The last line printed is JSON.
"""

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.score_throughput import make_export, make_images
from planet_batch.cluster.runtime import setup_logging
from planet_batch.config import ScoreConfig
from planet_batch.scoring.score import run_scoring


def sample(stop: threading.Event, samples: list):
    me = os.getpid()
    while not stop.is_set():
        t = time.perf_counter()
        for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == me or "ray" in cmd or "ray::" in (p.info["name"] or ""):
                mem = p.info["memory_info"]
                if mem is not None:
                    label = "driver" if p.info["pid"] == me else (p.info["name"] or cmd[:40])
                    samples.append((t, p.info["pid"], label, mem.rss / 2**20))
        stop.wait(1.0)


def halves(samples, t0, t1):
    """Per process: peak RSS (MB) in the first and second half of [t0, t1]."""
    mid = (t0 + t1) / 2
    out = {}
    for t, pid, label, rss in samples:
        if t0 <= t <= t1:
            first, second = out.get((pid, label), (0.0, 0.0))
            out[(pid, label)] = (max(first, rss), second) if t < mid else (first, max(second, rss))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=20000)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    setup_logging()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.n_images)
        export = make_export(tmp / "export", args.arch, args.size)
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample, args=(stop, samples), daemon=True)
        sampler.start()
        runs = []
        for i in range(2):
            t0 = time.perf_counter()
            summary = run_scoring(ScoreConfig(model=str(export), images=str(tmp / "images"),
                                              out=str(tmp / f"run{i}.csv"), tta=False))  # one view a pass
            runs.append({"wall_s": summary.wall_s, "images_per_s": summary.images_per_s,
                         "window": (t0, time.perf_counter())})
        stop.set()
        sampler.join()
        same = (tmp / "run0.csv").read_bytes() == (tmp / "run1.csv").read_bytes()
    report = []
    for i, run in enumerate(runs):
        per_proc = halves(samples, *run["window"])
        in_window = {t for t, *_ in samples if run["window"][0] <= t <= run["window"][1]}
        long_lived = {k: v for k, v in per_proc.items() if v[0] > 0 and v[1] > 0}
        worst = max(long_lived.items(), key=lambda kv: kv[1][1] / kv[1][0])
        driver = next(v for (pid, label), v in long_lived.items() if label == "driver")
        report.append({
            "run": i, "wall_s": run["wall_s"], "images_per_s": run["images_per_s"],
            "processes_sampled": len(per_proc),
            "driver_peak_mb_first_second_half": [round(driver[0]), round(driver[1])],
            "worst_growth_process": worst[0][1], "worst_growth_ratio": round(worst[1][1] / worst[1][0], 3),
            "total_peak_rss_mb": round(max(sum(r for t, _, _, r in samples if t == ts) for ts in in_window)),
        })
        print(json.dumps(report[-1]), flush=True)
    print(json.dumps({"bench": "soak", "n_images": args.n_images, "arch": args.arch, "size": args.size,
                      "same_output_both_runs": same, "runs": report}))


if __name__ == "__main__":
    main()
