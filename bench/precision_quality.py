"""Do bf16 and torch.compile change the answers? A trained export on held-out real chips, every mode.

    python bench/precision_quality.py --model runs/real/export --data ../shared/data/planet_sample

Scores the export's own validation split (chips it never trained on; the split the export's config
records) in fp32 eager (the reference), bf16 eager, fp32 compiled and bf16 compiled, 2 torch threads,
batch 64, and reports per mode: images/s, the largest probability difference from fp32, the share of
(image, tag) decisions at 0.2 and at the export's tuned thresholds that agree with fp32, and F2 against
the labels at 0.2 and tuned. The last line is JSON.
"""

import argparse
import json
import time

import numpy as np
import torch

from planet_batch.data import train_valid_split
from planet_batch.export import load_export
from planet_batch.metrics import fbeta
from planet_batch.model import compile_or_eager, inference
from planet_batch.runtime import setup_logging
from planet_batch.storage import Location
from planet_batch.transforms import decode_image, to_model_input


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    export = load_export(args.model)
    cfg = export.config
    _, valid = train_valid_split(args.data, cfg.get("valid_pct", 0.2), cfg.get("seed", 42))
    images = np.stack([decode_image(Location(valid.fs, p).read_bytes(), export.size) for p in valid.paths])
    device = torch.device("cpu")
    batches = [to_model_input(images[i:i + args.batch_size], device, export.mean, export.std)
               for i in range(0, len(images), args.batch_size)]
    tuned = np.asarray(export.thresholds)
    results, reference = [], None
    for precision, compiled in (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)):
        model = export.build(device)
        t0 = time.perf_counter()
        if compiled:
            model = compile_or_eager(model, batches[0], device, precision)
        compile_s = time.perf_counter() - t0
        with inference(device, precision):
            model(batches[0])
            t0 = time.perf_counter()
            probs = np.concatenate([torch.sigmoid(model(x).float()).numpy() for x in batches])
            rate = len(images) / (time.perf_counter() - t0)
        reference = probs if reference is None else reference
        row = {"precision": precision, "compiled": compiled, "compile_s": round(compile_s, 1),
               "images_per_s": round(rate, 1), "max_abs_diff_vs_fp32": float(np.abs(probs - reference).max()),
               "agreement_at_0.2": float(((probs > 0.2) == (reference > 0.2)).mean()),
               "agreement_tuned": float(((probs > tuned) == (reference > tuned)).mean()),
               "f2_at_0.2": round(fbeta(probs, valid.targets, 0.2), 4), "f2_tuned": round(fbeta(probs, valid.targets,
                                                                                                  tuned), 4)}
        print(row, flush=True)
        results.append(row)
    print(json.dumps({"bench": "precision_quality", "arch": export.arch, "size": export.size, "images": len(images),
                      "threads": args.threads, "modes": results}))


if __name__ == "__main__":
    main()
