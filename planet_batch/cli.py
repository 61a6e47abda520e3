"""`planet-batch` command line: one subcommand per capability, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from planet_batch.config import ConfigError
from planet_batch.labels import TAGS, LabelFileError
from planet_batch.layout import LayoutError

log = logging.getLogger("planet_batch")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except (ConfigError, LabelFileError, LayoutError) as e:
        print(f"planet-batch {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
