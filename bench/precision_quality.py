"""Do bf16 and torch.compile change the answers? A trained export on held-out real chips, every mode.

    python bench/precision_quality.py --model runs/real/export [--model runs/real2/export ...] \
        --data ../shared/data/planet_sample

Scores the export's own validation split (chips it never trained on; the split the export's config
records) in fp32 eager (the reference), bf16 eager, fp32 compiled and bf16 compiled, 2 torch threads,
batch 64, and reports per mode: images/s, the largest probability difference from fp32, the share of
(image, tag) decisions at 0.2 and at the export's tuned thresholds that agree with fp32, and F2 against
the labels at 0.2 and tuned. With several exports (say, several seeds) the last line also pools them: the
largest difference over all, the agreement over all decisions, and each mode's F2 change from fp32 (mean,
worst). The last line is JSON.
"""

import argparse
import json
import time

import numpy as np
import torch

from planet_batch.cluster.runtime import setup_logging
from planet_batch.cluster.storage import Location
from planet_batch.data.datasets import train_valid_split
from planet_batch.data.transforms import decode_image, to_model_input
from planet_batch.export import load_export
from planet_batch.model import compile_or_eager, inference
from planet_batch.training.metrics import fbeta


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append", help="an export; repeat for several")
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    per_model = [measure(m, args) for m in args.model]
    pooled = []
    for i, row in enumerate(per_model[0]):
        rows = [modes[i] for modes in per_model]
        n = [r["decisions"] for r in rows]
        pooled.append({
            "precision": row["precision"], "compiled": row["compiled"],
            "max_abs_diff_vs_fp32": max(r["max_abs_diff_vs_fp32"] for r in rows),
            "agreement_at_0.2": round(sum(r["agreement_at_0.2"] * k for r, k in zip(rows, n)) / sum(n), 5),
            "agreement_tuned": round(sum(r["agreement_tuned"] * k for r, k in zip(rows, n)) / sum(n), 5),
            "f2_change_at_0.2_mean": round(float(np.mean([r["f2_change_at_0.2"] for r in rows])), 4),
            "f2_change_at_0.2_worst": min(r["f2_change_at_0.2"] for r in rows),
            "f2_change_tuned_mean": round(float(np.mean([r["f2_change_tuned"] for r in rows])), 4),
            "f2_change_tuned_worst": min(r["f2_change_tuned"] for r in rows),
            "images_per_s_median": float(np.median([r["images_per_s"] for r in rows])),
        })
    print(json.dumps({"bench": "precision_quality", "exports": args.model, "threads": args.threads,
                      "images": sum(len_ for len_ in (m[0]["images"] for m in per_model)), "pooled": pooled,
                      "per_export": per_model}))


def measure(model_dir: str, args) -> list[dict]:
    export = load_export(model_dir)
    cfg = export.config
    _, valid = train_valid_split(args.data, cfg.get("valid_pct", 0.2), cfg.get("seed", 42))
    images = np.stack([decode_image(Location(valid.fs, p).read_bytes(), export.size) for p in valid.paths])
    device = torch.device("cpu")
    batches = [to_model_input(images[i:i + args.batch_size], device, export.normalize)
               for i in range(0, len(images), args.batch_size)]
    tuned = np.asarray(export.thresholds)
    results, reference = [], None
    for precision, compiled in (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)):
        model = export.build(device)
        t0 = time.perf_counter()
        if compiled:
            def warm_up(m, precision=precision):
                with inference(device, precision):
                    m(batches[0])

            model = compile_or_eager(model, warm_up)
        compile_s = time.perf_counter() - t0
        with inference(device, precision):
            model(batches[0])
            t0 = time.perf_counter()
            probs = np.concatenate([torch.sigmoid(model(x).float()).numpy() for x in batches])
            rate = len(images) / (time.perf_counter() - t0)
        reference = probs if reference is None else reference
        f2, f2_tuned = fbeta(probs, valid.targets, 0.2), fbeta(probs, valid.targets, tuned)
        if not results:
            f2_ref, f2_tuned_ref = f2, f2_tuned
        row = {"export": model_dir, "images": len(images), "decisions": probs.size, "precision": precision,
               "compiled": compiled, "compile_s": round(compile_s, 1), "images_per_s": round(rate, 1),
               "max_abs_diff_vs_fp32": float(np.abs(probs - reference).max()),
               "agreement_at_0.2": float(((probs > 0.2) == (reference > 0.2)).mean()),
               "agreement_tuned": float(((probs > tuned) == (reference > tuned)).mean()),
               "f2_at_0.2": round(f2, 4), "f2_tuned": round(f2_tuned, 4),
               "f2_change_at_0.2": round(f2 - f2_ref, 4), "f2_change_tuned": round(f2_tuned - f2_tuned_ref, 4)}
        print(row, flush=True)
        results.append(row)
    return results


if __name__ == "__main__":
    main()
