"""Transfer learning, measured: planet-batch against fastai 2.8 with the same body, recipe and chips.

    PYTHONPATH=. FAI_PYTHON=/path/to/fastai-venv/bin/python python bench/transfer_quality.py \
        --data ../shared/data/planet_sample --recipe lite0-imagenet --seeds 42 1 2

A fixed set of real chips (--test-chips, seeded by --test-seed, the same for every run) is never trained
or tuned on; each run trains on the rest with its seed's 80/20 train/validation split (the same split for
both frameworks), tunes per-class thresholds on its validation part, and is scored on the test chips: F2 at
0.2 and with the tuned thresholds, and the training wall time. fastai runs in its own venv (`FAI_PYTHON`,
which must also import planet_batch: PYTHONPATH), never as a dependency of planet-batch.

Recipes (the float lr is the notebook's `slice(lr)`: the head at lr, the body at lr/10, in both):
- lite0-imagenet: timm/tf_efficientnet_lite0 with its ImageNet weights, 128 px, 5 epochs frozen at 1e-2,
  then 5 unfrozen at slice(1e-5, 2e-3) (jobs/configs/lesson3-lite0.yaml);
- lite0-scratch / resnet18-scratch: the same body from random weights, 8 epochs unfrozen at 1e-2, 128 px.
Batch 64 a step in both (planet-batch: 2 workers x 32). The last line is JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "lite0-imagenet": {"arch": "timm/tf_efficientnet_lite0", "weights": "imagenet", "stages": [
        {"name": "stage-1", "size": 128, "epochs": 5, "frozen": True, "lr": 0.01},
        {"name": "stage-2", "size": 128, "epochs": 5, "frozen": False, "lr": [1e-5, 2e-3]}]},
    "lite0-scratch": {"arch": "timm/tf_efficientnet_lite0", "weights": "none", "stages": [
        {"name": "stage-1", "size": 128, "epochs": 8, "frozen": False, "lr": 0.01}]},
    "resnet18-scratch": {"arch": "resnet18", "weights": "none", "stages": [
        {"name": "stage-1", "size": 128, "epochs": 8, "frozen": False, "lr": 0.01}]},
}


def chips(data: Path, test_chips: int, test_seed: int, seed: int):
    """(train, valid, test) Splits: the fixed test chips, and the seed's 80/20 split of the rest."""
    from planet_batch.data.datasets import labelled_split
    from planet_batch.data.layout import split_indices

    every = labelled_split(data)
    pool_idx, test_idx = split_indices(every.names, test_chips / len(every), test_seed)
    pool = every.part(pool_idx)
    train_idx, valid_idx = split_indices(pool.names, 0.2, seed)
    return pool.part(train_idx), pool.part(valid_idx), every.part(test_idx)


def scores(test_probs, test_targets, valid_probs, valid_targets) -> dict:
    from planet_batch.training.metrics import fbeta, tune_thresholds

    thresholds = tune_thresholds(valid_probs, valid_targets, start=0.2)
    return {"f2": fbeta(test_probs, test_targets, 0.2), "f2_tuned": fbeta(test_probs, test_targets, thresholds)}


def run_planet_batch(args, seed: int, out: Path) -> dict:
    from planet_batch.cluster.runtime import ensure_ray
    from planet_batch.config import TrainConfig, from_dict, load_config, to_dict
    from planet_batch.export import load_export
    from planet_batch.training.folds import Fold, FoldRun, predict
    from planet_batch.training.job import TrainJob
    from planet_batch.training.train import run_training

    train, valid, test = chips(args.data, args.test_chips, args.test_seed, seed)
    base = load_config(TrainConfig, ROOT / "jobs/configs/lesson3-lite0.yaml")
    cfg = from_dict(TrainConfig, {**{k: v for k, v in to_dict(base).items() if k != "stages"},
                                  **RECIPES[args.recipe], "seed": seed, "precision": args.precision})
    ensure_ray()  # started once, outside the timing
    t0 = time.perf_counter()
    # its own split of the chips, run as a fold is (no fold ensemble)
    job = TrainJob.of(cfg, args.data, out / f"pb-{seed}")
    export = load_export(run_training(job, FoldRun(Fold(seed, train, valid))))
    wall = time.perf_counter() - t0
    valid_probs = predict(export, valid, "fp32")
    return {**scores(predict(export, test, "fp32"), test.targets, valid_probs, valid.targets), "wall_s": wall}


FASTAI_RUN = r'''
import json, sys, time
import numpy as np, pandas as pd, torch
from fastai.vision.all import *
from planet_batch.data.labels import TAGS
spec = json.loads(sys.argv[1])
torch.manual_seed(spec["seed"]); np.random.seed(spec["seed"])
df = pd.DataFrame({"name": spec["train"] + spec["valid"], "tags": spec["train_tags"] + spec["valid_tags"],
                   "is_valid": [False] * len(spec["train"]) + [True] * len(spec["valid"])})
size = spec["stages"][0]["size"]
dls = ImageDataLoaders.from_df(df, spec["images"], fn_col=0, suff=".jpg", label_col=1, label_delim=" ",
                               y_block=MultiCategoryBlock(vocab=list(TAGS)),  # a rare tag may be in valid only
                               valid_col="is_valid", item_tfms=Resize(size), bs=64, seed=spec["seed"],
                               batch_tfms=aug_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05,
                                                         max_warp=0.))
arch = spec["arch"][5:] if spec["arch"].startswith("timm/") else getattr(models, spec["arch"])
kw = {"pretrained_cfg_overlay": {"file": spec["weights_file"]}} if spec["weights_file"] else {}
learn = vision_learner(dls, arch, pretrained=bool(spec["weights_file"]), **kw,
                       metrics=[partial(accuracy_multi, thresh=0.2), FBetaMulti(2, thresh=0.2, average="samples")])
t0 = time.perf_counter()
for st in spec["stages"]:
    learn.freeze() if st["frozen"] else learn.unfreeze()
    lr = slice(*st["lr"]) if isinstance(st["lr"], list) else slice(st["lr"])
    learn.fit_one_cycle(st["epochs"], lr)
wall = time.perf_counter() - t0
order = [list(dls.vocab).index(t) if t in dls.vocab else None for t in TAGS]
def in_tags_order(p):
    p = p.numpy()
    return np.stack([p[:, j] if j is not None else np.zeros(len(p)) for j in order], 1)
valid, _ = learn.get_preds(ds_idx=1)
test, _ = learn.get_preds(dl=dls.test_dl([f"{spec['images']}/{n}.jpg" for n in spec["test"]]))
print("RESULT " + json.dumps({"valid": in_tags_order(valid).tolist(), "test": in_tags_order(test).tolist(),
                              "wall_s": wall}))
'''


def run_fastai(args, seed: int, out: Path) -> dict:
    from planet_batch.data.labels import TAGS
    from planet_batch.weights import import_packaged

    train, valid, test = chips(args.data, args.test_chips, args.test_seed, seed)
    recipe = RECIPES[args.recipe]
    weights_file = str(import_packaged(recipe["arch"], out / "lite0.safetensors")) \
        if recipe["weights"] == "imagenet" else None

    def tags(split):
        return [" ".join(t for t, on in zip(TAGS, row) if on) for row in split.targets]

    spec = {"seed": seed, "images": str(Path(args.data) / "train-jpg"), "arch": recipe["arch"],
            "weights_file": weights_file, "stages": recipe["stages"], "train": list(train.names),
            "valid": list(valid.names), "test": list(test.names), "train_tags": tags(train), "valid_tags": tags(valid)}
    run = subprocess.run([os.environ["FAI_PYTHON"], "-c", FASTAI_RUN, json.dumps(spec)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [s for s in run.stdout.splitlines() if s.startswith("RESULT ")]
    if run.returncode or not line:
        sys.exit(f"fastai run failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    print("\n".join(s for s in run.stdout.splitlines() if not s.startswith("RESULT ")), file=sys.stderr)
    r = json.loads(line[-1][len("RESULT "):])
    return {**scores(np.asarray(r["test"]), test.targets, np.asarray(r["valid"]), valid.targets), "wall_s": r["wall_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--recipe", choices=RECIPES, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--frameworks", nargs="+", choices=["planet-batch", "fastai"], default=["planet-batch", "fastai"])
    p.add_argument("--test-chips", type=int, default=140)
    p.add_argument("--test-seed", type=int, default=1000)
    p.add_argument("--precision", default="auto", help="planet-batch's training precision")
    args = p.parse_args()
    from planet_batch.cluster.runtime import setup_logging

    setup_logging()
    runners = {"planet-batch": run_planet_batch, "fastai": run_fastai}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # side by side, seed by seed
            for fw in args.frameworks:
                r = {"recipe": args.recipe, "framework": fw, "seed": seed, **runners[fw](args, seed, Path(tmp))}
                print(f"{fw:>13} seed {seed:>3}: F2 {r['f2']:.4f} at 0.2, {r['f2_tuned']:.4f} tuned, "
                      f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
                print(json.dumps(r), flush=True)
                results.append(r)
    summary = {fw: {k: float(np.mean([r[k] for r in results if r["framework"] == fw]))
                    for k in ("f2", "f2_tuned", "wall_s")} for fw in args.frameworks}
    print(json.dumps({"recipe": args.recipe, "runs": results, "mean": summary}))


if __name__ == "__main__":
    main()
