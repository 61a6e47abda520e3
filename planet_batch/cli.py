"""`planet-batch` command line: one subcommand per capability, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from planet_batch.config import ConfigError
from planet_batch.export import ExportError
from planet_batch.labels import TAGS, LabelFileError
from planet_batch.layout import LayoutError
from planet_batch.model import WeightsError
from planet_batch.runtime import CapacityError, setup_logging
from planet_batch.train import TrainError


def cmd_demo_data(args) -> None:
    from planet_batch.demo_data import write_demo_data

    out = write_demo_data(args.out, args.n_train, args.n_test, args.n_additional, args.seed)
    print(f"demo dataset: {out}")


def cmd_show_batch(args) -> None:
    from planet_batch.data import augmented_sample, train_valid_split
    from planet_batch.plots import show_batch

    train, _ = train_valid_split(args.data)
    images, _, targets = augmented_sample(train, args.rows * args.rows, args.size, args.seed)
    titles = [";".join(t for t, on in zip(TAGS, row) if on) for row in targets]
    print(f"show_batch: {show_batch(images, titles, args.out, args.rows)}")


def train_config(args):
    from planet_batch.config import TrainConfig, load_config

    flags = {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "storage": args.storage}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + (["gpu=true"] if args.gpu else [])
    return load_config(TrainConfig, args.config, [*args.set, *overrides])


def cmd_train(args) -> None:
    from planet_batch.train import run_training

    export = run_training(train_config(args), args.data, args.out)
    print(f"run folder: {args.out}\nmetrics: {args.out}/metrics.csv\nexport: {export}")


def cmd_lr_find(args) -> None:
    from planet_batch.lr_find import run_lr_find

    result = run_lr_find(train_config(args), args.data, args.out, args.num_it)
    print(f"suggested lr: {result.suggestion:.2e} (steepest descent of the smoothed loss)\nplot: {args.out}")


def add_train_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True, help="job config YAML, e.g. jobs/configs/lesson3.yaml")
    s.add_argument("--data", required=True, help="data root (competition or Kaggle-dataset layout)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages.0.epochs=2 (repeatable)")
    s.add_argument("--workers", type=int, help="Ray Train workers; 0 runs everything in the driver")
    s.add_argument("--cpus-per-worker", type=float)
    s.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    s.add_argument("--storage", help="Ray Train storage: local path, NFS or s3://bucket/prefix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="planet-batch", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-data", help="write a generated competition-layout dataset")
    s.add_argument("out")
    s.add_argument("--n-train", type=int, default=1000)
    s.add_argument("--n-test", type=int, default=300)
    s.add_argument("--n-additional", type=int, default=150)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("show-batch", help="grid of augmented training images with their tags")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--rows", type=int, default=3)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_show_batch)

    s = sub.add_parser("train", help="train the config's stages with Ray Train and export the model")
    add_train_options(s)
    s.add_argument("--out", required=True, help="run folder (metrics.csv, losses.png, stages/, export/)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("lr-find", help="LR range test for the config's first stage")
    add_train_options(s)
    s.add_argument("--out", required=True, help="plot file, e.g. lr.png")
    s.add_argument("--num-it", type=int, default=100)
    s.set_defaults(func=cmd_lr_find)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except (ConfigError, LabelFileError, LayoutError, CapacityError, WeightsError, ExportError, TrainError) as e:
        print(f"planet-batch {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
