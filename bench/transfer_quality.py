"""Recipe quality on real chips: planet-batch's single model and fold ensemble, each with and without TTA,
against fastai 2.8 with the same body and recipe, with and without its `learn.tta()`.

    PYTHONPATH=. FAI_PYTHON=/path/to/fastai-venv/bin/python python bench/transfer_quality.py \
        --data ../shared/data/planet_sample --config jobs/configs/lesson3-cpu.yaml --seeds 42 1 2 \
        --runs single folds fastai
    python bench/transfer_quality.py --data ../shared/data/planet_sample --write-pool POOL   # what a search sees

A fixed set of real chips (--test-chips, seeded by --test-seed, the same for every run) is the test set: nothing
trains, tunes thresholds or searches on it. The other chips are the pool, written as a data folder of its own
(links to the chips and their labels): every run here trains on it, and `planet-batch tune --data POOL`
searches on it. Each seed, on the pool:
- single: `train` of the config with that seed (its valid_pct split), thresholds tuned on its validation part;
- folds: `train --folds K` with that seed, the ensemble of the K fold models, thresholds tuned out of fold;
- fastai: the same body, weights, stages, learning rates and batch a step on the single run's split.
Each is scored on the test chips at 0.2 and with its tuned thresholds, without and with TTA: planet-batch's
`score --tta` (the mean of the 8 flips and quarter turns; the thresholds tuned again on the validation or
out-of-fold rows predicted the same way), fastai's `learn.tta()` (its default: 4 passes of the training
augmentation blended with the plain one). Wall time: the training alone (planet-batch: Ray up, each run's
start-up included). --recipe swaps in the stages of a from-scratch recipe. The last line is JSON.
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
FROM_SCRATCH = {  # the float lr is the notebook's `slice(lr)`: the head at lr, the body at lr/10, in both
    "lite0-scratch": {"arch": "timm/tf_efficientnet_lite0", "weights": "none", "stages": [
        {"name": "stage-1", "size": 128, "epochs": 8, "frozen": False, "lr": 0.01}]},
    "resnet18-scratch": {"arch": "resnet18", "weights": "none", "stages": [
        {"name": "stage-1", "size": 128, "epochs": 8, "frozen": False, "lr": 0.01}]},
}


def write_pool(data: Path, out: Path, test_chips: int, test_seed: int):
    """The chips that are not test chips as a data folder of links (train-jpg/, train_v2.csv); the test Split."""
    from planet_batch.data.datasets import labelled_split
    from planet_batch.data.labels import decode
    from planet_batch.data.layout import split_indices

    every = labelled_split(data)
    pool_idx, test_idx = split_indices(every.names, test_chips / len(every), test_seed)
    (out / "train-jpg").mkdir(parents=True)
    pool = every.part(pool_idx)
    for name, path in zip(pool.names, pool.paths):
        (out / "train-jpg" / f"{name}.jpg").symlink_to(Path(path).resolve())
    rows = [f"{name},{tags}" for name, tags in zip(pool.names, decode(pool.targets, 0.5))]  # multi-hot back to tags
    (out / "train_v2.csv").write_text("\n".join(["image_name,tags", *rows]) + "\n")
    return every.part(test_idx)


def scores(test_probs, test_targets, rows_probs, rows_targets) -> tuple[float, float]:
    """F2 on the test chips at 0.2, and with per-class thresholds tuned on the validation (or OOF) rows."""
    from planet_batch.training.metrics import fbeta, tune_thresholds

    thresholds = tune_thresholds(rows_probs, rows_targets, start=0.2)
    return fbeta(test_probs, test_targets, 0.2), fbeta(test_probs, test_targets, thresholds)


def score_models(models, held_out, test) -> dict:
    """`models` averaged on the test chips; `held_out`: (model, split) pairs whose rows tune the thresholds,
    each row predicted by the model that did not train on it. Without and with TTA; the test images/s."""
    from planet_batch.training.folds import predict

    r = {}
    targets = np.concatenate([part.targets for _, part in held_out])
    for tta, key in ((False, ""), (True, "_tta")):
        rows = np.concatenate([predict(m, part, "auto", tta=tta) for m, part in held_out])
        t0 = time.perf_counter()
        probs = np.mean([predict(m, test, "auto", tta=tta) for m in models], 0)
        r[f"test_img_s{key}"] = len(test) / (time.perf_counter() - t0)
        r[f"f2{key}"], r[f"f2_tuned{key}"] = scores(probs, test.targets, rows, targets)
    return r


def config(args, seed: int, **fields):
    from planet_batch.config import TrainConfig, from_dict, load_config, to_dict

    base = to_dict(load_config(TrainConfig, args.config))
    return from_dict(TrainConfig, {**base, **FROM_SCRATCH.get(args.recipe, {}), "seed": seed, **fields})


def run_single(args, seed: int, pool: Path, test, out: Path) -> dict:
    from planet_batch.data.datasets import train_valid_split
    from planet_batch.export import load_export
    from planet_batch.training.job import train

    cfg = config(args, seed)
    t0 = time.perf_counter()
    export = load_export(train(cfg, pool, out / f"single-{seed}"))
    wall = time.perf_counter() - t0
    _, valid = train_valid_split(pool, cfg.valid_pct, seed)
    return {**score_models([export], [(export, valid)], test), "wall_s": wall}


def run_folds(args, seed: int, pool: Path, test, out: Path) -> dict:
    from planet_batch.cluster.storage import locate
    from planet_batch.export import load_model
    from planet_batch.training.folds import make_folds
    from planet_batch.training.job import train

    cfg = config(args, seed, folds=args.folds)
    t0 = time.perf_counter()
    export = train(cfg, pool, out / f"folds-{seed}")
    wall = time.perf_counter() - t0
    members = load_model(export).members
    held = {f.name: f.held_out for f in make_folds(locate(pool), args.folds, seed)}
    pairs = [(m, held[m.weights.parent.parent.name]) for m in members]  # RUN/fold-i/export/
    return {**score_models(members, pairs, test), "wall_s": wall}


FASTAI_RUN = r'''
import json, sys, time
import numpy as np, pandas as pd, torch
from fastai.vision.all import *
from planet_batch.data.labels import TAGS
spec = json.loads(sys.argv[1])
torch.manual_seed(spec["seed"]); np.random.seed(spec["seed"])
df = pd.DataFrame({"name": spec["train"] + spec["valid"], "tags": spec["train_tags"] + spec["valid_tags"],
                   "is_valid": [False] * len(spec["train"]) + [True] * len(spec["valid"])})
dls = ImageDataLoaders.from_df(df, spec["images"], fn_col=0, suff=".jpg", label_col=1, label_delim=" ",
                               y_block=MultiCategoryBlock(vocab=list(TAGS)),  # a rare tag may be in valid only
                               valid_col="is_valid", item_tfms=Resize(spec["size"]), bs=spec["bs"], seed=spec["seed"],
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
    return np.stack([p[:, j] if j is not None else np.zeros(len(p)) for j in order], 1).tolist()
test_dl = dls.test_dl(spec["test"])
out = {"wall_s": wall, "valid": in_tags_order(learn.get_preds(ds_idx=1)[0]),
       "test": in_tags_order(learn.get_preds(dl=test_dl)[0]),
       "valid_tta": in_tags_order(learn.tta(ds_idx=1)[0]), "test_tta": in_tags_order(learn.tta(dl=test_dl)[0])}
print("RESULT " + json.dumps(out))
'''


def run_fastai(args, seed: int, pool: Path, test, out: Path) -> dict:
    from planet_batch.config import to_dict
    from planet_batch.data.datasets import train_valid_split
    from planet_batch.data.labels import decode
    from planet_batch.weights import import_packaged

    cfg = config(args, seed)
    if len({s.size for s in cfg.stages}) > 1:
        sys.exit("fastai here runs one size: every stage of the config at the same size")
    train, valid = train_valid_split(pool, cfg.valid_pct, seed)
    weights = str(import_packaged(cfg.arch, out / "weights.safetensors")) if cfg.weights == "imagenet" else None

    spec = {"seed": seed, "images": str(pool / "train-jpg"), "arch": cfg.arch, "weights_file": weights,
            "size": cfg.stages[0].size, "bs": cfg.batch_size * max(cfg.workers, 1),
            "stages": to_dict(cfg)["stages"], "train": list(train.names), "valid": list(valid.names),
            "train_tags": decode(train.targets, 0.5), "valid_tags": decode(valid.targets, 0.5),
            "test": list(test.paths)}
    run = subprocess.run([os.environ["FAI_PYTHON"], "-c", FASTAI_RUN, json.dumps(spec)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [s for s in run.stdout.splitlines() if s.startswith("RESULT ")]
    if run.returncode or not line:
        sys.exit(f"fastai run failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    print("\n".join(s for s in run.stdout.splitlines() if not s.startswith("RESULT ")), file=sys.stderr)
    r = json.loads(line[-1][len("RESULT "):])
    f2, f2_tuned = scores(np.asarray(r["test"]), test.targets, np.asarray(r["valid"]), valid.targets)
    f2_tta, f2_tuned_tta = scores(np.asarray(r["test_tta"]), test.targets, np.asarray(r["valid_tta"]), valid.targets)
    return {"f2": f2, "f2_tuned": f2_tuned, "f2_tta": f2_tta, "f2_tuned_tta": f2_tuned_tta, "wall_s": r["wall_s"]}


RUNS = {"single": run_single, "folds": run_folds, "fastai": run_fastai}
FIGURES = ("f2", "f2_tuned", "f2_tta", "f2_tuned_tta", "wall_s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the real chips: train-jpg/ and train_v2.csv")
    p.add_argument("--config", type=Path, default=ROOT / "jobs/configs/lesson3-cpu.yaml")
    p.add_argument("--recipe", choices=FROM_SCRATCH, help="a from-scratch recipe in place of the config's stages")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--runs", nargs="+", choices=RUNS, default=["single", "fastai"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-chips", type=int, default=140)
    p.add_argument("--test-seed", type=int, default=1000)
    p.add_argument("--write-pool", type=Path, help="only write the pool's data folder here")
    args = p.parse_args()
    from planet_batch.cluster.runtime import ensure_ray, setup_logging

    setup_logging()
    if args.write_pool:
        write_pool(args.data, args.write_pool, args.test_chips, args.test_seed)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        test = write_pool(args.data, pool, args.test_chips, args.test_seed)
        ensure_ray()  # started once, outside the timings
        for seed in args.seeds:  # side by side, seed by seed
            for run in args.runs:
                r = {"config": args.config.name, "recipe": args.recipe, "run": run, "seed": seed,
                     **RUNS[run](args, seed, pool, test, Path(tmp))}
                print(f"{run:>6} seed {seed:>3}: F2 {r['f2']:.4f} at 0.2, {r['f2_tuned']:.4f} tuned; with TTA "
                      f"{r['f2_tta']:.4f}, {r['f2_tuned_tta']:.4f}; {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
                print(json.dumps(r), flush=True)
                results.append(r)
    summary = {run: {k: float(np.mean([r[k] for r in results if r["run"] == run])) for k in FIGURES}
               for run in args.runs}
    print(json.dumps({"config": args.config.name, "runs": results, "mean": summary}))


if __name__ == "__main__":
    main()
