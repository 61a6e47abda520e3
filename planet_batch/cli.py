"""`planet-batch` command line: one subcommand per capability, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from planet_batch.errors import PlanetBatchError
from planet_batch.runtime import setup_logging


def cmd_demo_data(args) -> None:
    from planet_batch.demo_data import write_demo_data

    out = write_demo_data(args.out, args.n_train, args.n_test, args.n_additional, args.seed)
    print(f"demo dataset: {out}")


def cmd_show_batch(args) -> None:
    from planet_batch.data import augmented_sample, train_valid_split
    from planet_batch.labels import TAGS
    from planet_batch.plots import show_batch

    train, _ = train_valid_split(args.data)
    images, _, targets = augmented_sample(train, args.rows * args.rows, args.size, args.seed)
    titles = [";".join(t for t, on in zip(TAGS, row) if on) for row in targets]
    print(f"show_batch: {show_batch(images, titles, args.out, args.rows)}")


def train_config(args):
    from planet_batch.config import TrainConfig, load_config

    flags = {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "storage": args.storage}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += [f"{k}=true" for k in ("gpu", "data_shared") if getattr(args, k)]
    return load_config(TrainConfig, args.config, [*args.set, *overrides])


def cmd_train(args) -> None:
    from planet_batch.train import run_training

    export = run_training(train_config(args), args.data, args.out)
    print(f"run folder: {args.out}\nmetrics: {args.out}/metrics.csv\nexport: {export}")


def cmd_lr_find(args) -> None:
    from planet_batch.lr_find import run_lr_find

    result = run_lr_find(train_config(args), args.data, args.out, args.num_it)
    print(f"suggested lr: {result.suggestion:.2e} (steepest descent of the smoothed loss)\nplot: {args.out}")


def cmd_score(args) -> None:
    from planet_batch.config import ScoreConfig, load_config
    from planet_batch.score import run_scoring
    from planet_batch.storage import locate

    flags = {
        "model": args.model, "data": args.data, "images": args.images, "out": args.out, "threshold": args.threshold,
        "batch_size": args.batch_size, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
        "gpus_per_actor": args.gpus_per_actor, "probs_out": args.probs_out, "stall_timeout_s": args.stall_timeout,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += [f"{k}=true" for k in ("tta", "strict", "overwrite", "data_shared") if getattr(args, k)]
    summary = run_scoring(load_config(ScoreConfig, args.config, [*args.set, *overrides]))
    print(f"submission: {summary.output}\nsummary: {locate(summary.output).with_name('score_summary.json')}")
    if summary.bad_images:
        print(f"unreadable images: {summary.unreadable}, listed in {summary.bad_images}")
    if summary.probs:
        print(f"probabilities: {summary.probs}")


def cmd_check_submission(args) -> int:
    from planet_batch.submission import check_submission

    problems = check_submission(args.file, args.sample)
    for p in problems:
        print(f"{args.file}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.file}: OK" + (f" against {args.sample}" if args.sample else ""))
    return 1 if problems else 0


def cmd_download(args) -> None:
    from planet_batch.kaggle import download

    print(f"data root: {download(args.to, competition=args.competition, dataset=args.dataset)}")


def cmd_submit(args) -> None:
    from planet_batch.kaggle import submit

    submit(args.file, args.message, competition=args.competition, sample=args.sample)
    print(f"submitted {args.file} to {args.competition}")


def add_train_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True, help="job config YAML, e.g. jobs/configs/lesson3.yaml")
    s.add_argument("--data", required=True, help="data root (competition or Kaggle-dataset layout): a path or a URI "
                   "(s3://bucket/prefix, gs://, hdfs://, file://)")
    s.add_argument("--data-shared", action="store_true",
                   help="the local --data path is mounted on every node (NFS): read it everywhere")
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
    s.add_argument("--data", required=True, help="data root: a path or a URI")
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

    s = sub.add_parser("score", help="score test images with Ray Data into a Kaggle submission")
    s.add_argument("--model", help="export folder, e.g. RUN_DIR/export (a path or a URI)")
    s.add_argument("--data", help="Kaggle data root: test-jpg + test-jpg-additional in the sample submission's order "
                   "(a path or a URI: s3://bucket/prefix, gs://, hdfs://, file://)")
    s.add_argument("--images", help="score any folder of .jpg files instead (a path or a URI)")
    s.add_argument("--data-shared", action="store_true",
                   help="the local --data/--images path is mounted on every node (NFS): read it everywhere")
    s.add_argument("--out", help="submission CSV (default submission.csv), a path or a URI; side files go next to it")
    s.add_argument("--threshold", help="a number (default 0.2) or 'tuned' for the export's per-class thresholds")
    s.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--actors", type=int, help="predictor actors (default: one per GPU, or one per CPU)")
    s.add_argument("--cpus-per-actor", type=float)
    s.add_argument("--gpus-per-actor", type=float)
    s.add_argument("--probs-out", help="also write every probability to this Parquet file")
    s.add_argument("--strict", action="store_true", help="fail instead of giving unreadable images empty tags")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--stall-timeout", type=float, help="fail after this many seconds without a scored batch "
                   "(default 600; 0 waits forever)")
    s.add_argument("--config", help="score config YAML (flags override it)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("check-submission", help="check a submission CSV; exit 1 with the reasons")
    s.add_argument("file")
    s.add_argument("--sample", help="the sample submission whose names and order must match")
    s.set_defaults(func=cmd_check_submission)

    from planet_batch.kaggle import COMPETITION

    s = sub.add_parser("download", help="fetch and extract the Planet files from Kaggle")
    s.add_argument("--to", required=True)
    which = s.add_mutually_exclusive_group()
    which.add_argument("--competition", help=f"competition files (default: {COMPETITION})")
    which.add_argument("--dataset", help="a Kaggle dataset instead, e.g. nikitarom/planets-dataset")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("submit", help="check a submission, then submit it to the competition")
    s.add_argument("file")
    s.add_argument("-m", "--message", required=True)
    s.add_argument("--competition", default=COMPETITION)
    s.add_argument("--sample", help="sample submission to check names and order against")
    s.set_defaults(func=cmd_submit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args) or 0
    except PlanetBatchError as e:
        print(f"planet-batch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
