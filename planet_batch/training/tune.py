"""`planet-batch tune`: Ray Tune over the lesson-3 stages, each trial one Ray Train run of a training config.

    planet-batch tune --config jobs/configs/lesson3-lite0.yaml --space jobs/configs/search-lite.yaml \
        --data DATA --out runs/search

The search space is a YAML file beside the training config: which fields to draw (any field of the config by
its `--set` path, `stages.*.FIELD` for every stage at once) and from what (`choice`, `uniform`, `loguniform`,
`randint`). Every value it can draw is checked against the config before Ray starts. Each trial is
`train.run_training` on its own run folder OUT/trials/trial-NN, reporting every epoch to Ray Tune
(`TuneReportCallback`, as Ray documents Tune with Ray Train); ASHA stops the trials whose validation F2 trails
at the same epoch. A killed driver's search goes on with the same command (`Tuner.restore`): finished trials
are kept, unfinished ones resume from their Ray Train checkpoints. OUT/results.csv is the table and OUT/best.yaml
the best trial's config, which `planet-batch train` runs as is. Trials score on their validation chips, so the
best trial's F2 is optimistic: compare recipes on chips no search saw (docs/training.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
import yaml

from planet_batch.cluster.runtime import ensure_ray, runs_that_fit
from planet_batch.cluster.storage import Location, locate, write_atomic
from planet_batch.config import (
    ConfigError,
    Int,
    TrainConfig,
    config_model,
    flag,
    from_dict,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)
from planet_batch.tracking import RUN_FILE, Run, Tracker, flat_params, tracked
from planet_batch.training.folds import finished_export
from planet_batch.training.run_folder import RUN_ID_FILE, mark_run_folder, same_run
from planet_batch.training.train import SubRun, TrainError, run_training
from planet_batch.training.worker import run_seconds

log = logging.getLogger("planet_batch.training.train")  # the run's console lines (docs/console.md)

Domain = Literal["grid", "choice", "uniform", "loguniform", "randint"]
DOMAINS = get_args(Domain)
METRIC = "fbeta"  # validation F2 at the config's threshold, every epoch


@config_model
class SearchSpace:
    space: dict[str, dict[Domain, Any]] = flag(
        help="FIELD: {grid: [...]} | {choice: [...]} | {uniform: [LO, HI]} | {loguniform: [LO, HI]} | "
        "{randint: [LO, HI]}; FIELD is a config path as --set takes it (stages.0.lr), stages.*.FIELD for every "
        "stage", min_length=1)
    trials: Int = flag(8, help="draws from the space (each runs every value of a grid)", ge=1, le=10000)
    concurrent: Int = flag(0, help="trials at once (0: as many as the cluster holds)", ge=0, le=1000)
    grace_epochs: Int = flag(2, help="ASHA: epochs every trial trains before it can be stopped", ge=1, le=1000)
    reduction_factor: Int = flag(2, help="ASHA: one trial in this many goes on at each rung", ge=2, le=100)
    seed: Int = flag(0, help="seed of the draws")

    @property
    def count(self) -> int:
        """Trials in all: each draw runs every combination of the grids."""
        return self.trials * math.prod(len(d["grid"]) for d in self.space.values() if "grid" in d)


def _set(data: dict, path: str, value: Any) -> None:
    """One `path: value` into plain config data; ConfigError naming the path when it leads nowhere."""
    *parents, leaf = path.split(".")
    nodes: list = [data]
    for p in parents:
        nxt = []
        for n in nodes:
            if isinstance(n, list):
                if p == "*":
                    nxt.extend(n)
                    continue
                try:
                    nxt.append(n[int(p)])
                except (ValueError, IndexError):
                    raise ConfigError(f"space: {path}: no {p!r} (the config has {len(n)} stages)") from None
            elif isinstance(n, dict) and isinstance(n.get(p), (dict, list)):
                nxt.append(n[p])
            else:
                raise ConfigError(f"space: {path}: the config has no {p!r} there")
        nodes = nxt
    for n in nodes:
        n[leaf] = value


def trial_config(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """The base config with one trial's drawn values (every field checked)."""
    data = to_dict(base)
    for path, value in values.items():
        _set(data, path, value)
    return from_dict(TrainConfig, data)


def candidates(kind: str, args: Any) -> list:
    """The values of a domain that stand for all it can draw: every choice, or a range's two ends."""
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{kind}: expected a non-empty list")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise ConfigError(f"{kind}: expected [LO, HI] with LO < HI")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError("loguniform: LO must be above 0")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError("randint: expected two integers")
    return list(args)


def check_space(base: TrainConfig, search: SearchSpace) -> None:
    """Every value the space can draw makes a valid config (a range by its two ends), before Ray starts."""
    for path, domain in search.space.items():
        if len(domain) != 1:
            raise ConfigError(f"space: {path}: one of {', '.join(DOMAINS)}, got {sorted(domain) or 'none'}")
        ((kind, args),) = domain.items()
        try:
            for value in candidates(kind, args):
                trial_config(base, {path: value})
        except ConfigError as e:
            raise ConfigError(f"space: {path}: {str(e).removeprefix('space: ').removeprefix(f'{path}: ')}"
                              ) from None


def check_bodies(base: TrainConfig, search: SearchSpace) -> None:
    """Every body the space can draw, with its weights, built once here (a missing cache or a timm typo is one
    line now, not a failed trial later)."""
    from planet_batch.data.labels import TAGS
    from planet_batch.model import build_model

    drawn = {p: candidates(*next(iter(d.items()))) for p, d in search.space.items() if p in ("arch", "weights")}
    for arch in drawn.get("arch", [base.arch]):
        for weights in drawn.get("weights", [base.weights]):
            build_model(arch, len(TAGS), weights=weights)


def param_space(search: SearchSpace) -> dict:
    from ray import tune

    def domain(kind: str, args):
        if kind == "grid":
            return tune.grid_search(args)
        if kind == "choice":
            return tune.choice(args)
        if kind == "randint":
            return tune.randint(args[0], args[1] + 1)  # both ends, as the YAML reads
        return getattr(tune, kind)(*args)

    return {path: domain(*next(iter(d.items()))) for path, d in search.space.items()}


def load_space(path: Path | str) -> SearchSpace:
    data = read_yaml(path)
    try:
        return from_dict(SearchSpace, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Search:
    """One search: the base config, its space, the data, the search folder, the MLflow server."""

    cfg: TrainConfig
    space: SearchSpace
    data: Location
    out: Path
    tracker: Tracker | None = None
    parent: Run | None = field(default=None, compare=False)  # the search's MLflow run
    side_by_side: int = 1

    def trial_dir(self, name: str) -> Path:
        return self.out / "trials" / name


def trial_name(trial) -> str:
    """trial-NN from Tune's trial id (`abcde_00003`), the same after a restore."""
    return f"trial-{int(trial.trial_id.rsplit('_', 1)[-1]):02d}"


def run_trial(values: dict, search: Search) -> None:
    """Ray Tune's trainable: one trial, the lesson-3 stages of its config as one Ray Train run in its own run
    folder, every epoch reported to Tune; the same trial after a restore resumes from its checkpoints."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from planet_batch.cluster.runtime import setup_logging
    from planet_batch.training.job import TrainJob

    setup_logging(False)
    name = tune.get_context().get_trial_name()
    cfg = trial_config(search.cfg, values)
    job = TrainJob(cfg, search.data, search.trial_dir(name), search.tracker)
    done = finished_export(job.out, cfg)
    if done is not None:  # finished before the driver was lost, after Tune last saved the search's state
        log.info("%s: finished by an earlier run, export kept: %s", name, job.out / "export")
        tune.report(last_report(job.out))
        return
    run_training(job, SubRun(name, search.parent, None, search.side_by_side, (TuneReportCallback(),)))


def last_report(run_dir: Path) -> dict:
    """A finished trial's last epoch as its run folder keeps it, in the form of its reports to Tune."""
    epochs = pd.read_csv(run_dir / "metrics.csv").to_dict("records")
    return epochs[-1] | {"step": len(epochs), "epoch_seconds": run_seconds(epochs)}


def tuner(search: Search, concurrent: int):
    """A new Tuner, or the one of a search this folder holds (a killed driver's): the same command goes on."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # The trial's driver side (its run folder, its Ray Train controller) stays on this node, where OUT is; its
    # workers take the CPUs. A trial itself needs none.
    here = {"cpu": 0, "custom_resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search), here)
    storage = str(search.out / "tune")
    # The console is the trials' epoch tables and the results table: Tune's own output engine prints its
    # experiment box and paths even when silent (`verbose=0`), the older one does not.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if tune.Tuner.can_restore(f"{storage}/search"):
        log.info("resuming the search in %s: finished trials are kept, unfinished ones resume", search.out)
        return tune.Tuner.restore(f"{storage}/search", trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(search.space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=search.space.trials,
            # ASHA on the epochs every trial reports (`step`, which a resumed trial goes on counting)
            scheduler=ASHAScheduler(time_attr="step", grace_period=search.space.grace_epochs,
                                    reduction_factor=search.space.reduction_factor, max_t=10**6),
            # (its own limit: Tune ignores max_concurrent_trials beside a search algorithm given as an instance)
            search_alg=tune.search.BasicVariantGenerator(random_state=search.space.seed, max_concurrent=concurrent),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name="search", storage_path=storage, verbose=0),
    )


def results_table(search: Search, grid) -> pd.DataFrame:
    """One row per trial: whether it finished or ASHA stopped it, its epochs, its last validation F2, the seconds
    of its epochs, and its drawn values; a finished trial's from its run folder's metrics.csv, a stopped one's from
    its last report to Tune (Tune keeps it across a restore, but may miss the report of a run's very last epoch).
    The finished recipes first, by their final F2 (what the best config trains to); then the stopped ones."""
    rows = []
    for result in grid:
        name = trial_name_of(result)
        folder = search.trial_dir(name)
        finished = (folder / "export" / "model.json").is_file()
        last = last_report(folder) if finished else result.metrics or {}
        status = "finished" if finished else "error" if result.error else "stopped"
        rows.append({"trial": name, "status": status, "epochs": int(last.get("step", 0)),
                     METRIC: last.get(METRIC, math.nan), "seconds": last.get("epoch_seconds", math.nan)}
                    | {k: str(v) for k, v in result.config.items()})
    table = pd.DataFrame(rows)
    order = table.assign(_finished=table["status"] == "finished").sort_values(
        ["_finished", METRIC], ascending=False, na_position="last")
    return table.loc[order.index].reset_index(drop=True)


def trial_name_of(result) -> str:
    return Path(result.path).name


SEARCH_WRITTEN = ("config.yaml", "space.yaml", "results.csv", "best.yaml", "trials", "tune", RUN_FILE)


def claim_search_folder(out: Path, cfg: TrainConfig, space: SearchSpace) -> None:
    """A search folder holds one search: the same config and space go on where it stopped; another is refused, and
    so is a folder holding what a search would write but did not write. Writes nothing."""
    if not (out / RUN_ID_FILE).is_file():
        if out.exists() and not out.is_dir():
            raise TrainError(f"search folder {out} is a file; give another --out")
        theirs = [n for n in SEARCH_WRITTEN if (out / n).exists()]
        if theirs:
            raise TrainError(f"search folder {out} holds {', '.join(theirs)}, not written by planet-batch (no "
                             f"{RUN_ID_FILE}): give another --out; nothing there is touched")
        return
    saved, saved_space = out / "config.yaml", out / "space.yaml"
    differs = same_run(load_config(TrainConfig, saved), cfg) if saved.is_file() else None
    if differs is None and saved_space.is_file() and load_space(saved_space) != space:
        differs = "the search space"
    if differs:
        raise TrainError(f"search folder {out} holds a search of another config ({differs}): the same config and "
                         "space go on with it; give another --out")


def run_search(cfg: TrainConfig, space: SearchSpace, data: Path | str, out: Path | str,
               tracker: Tracker | None = None) -> Path:
    """The search of `space` around `cfg` on `data` into the search folder `out`; the best config's YAML."""
    out = Path(out).resolve()
    check_space(cfg, space)  # every drawable value, before Ray
    check_bodies(cfg, space)
    claim_search_folder(out, cfg, space)
    data = locate(data)
    if tracker:
        mark_run_folder(out)
    parent = tracker.open(out.name, params=flat_params(to_dict(cfg)) | {"space": yaml.safe_dump(space.space)},
                          tags={"planet_batch.job": "tune", "planet_batch.run_folder": str(out)},
                          keep_in=out) if tracker else None
    with tracked(parent):
        ensure_ray()
        concurrent = space.concurrent or runs_that_fit(cfg.workers, cfg.cpus_per_worker, cfg.gpu, space.count)
        search = Search(cfg, space, data, out, tracker, parent, concurrent)
        mark_run_folder(out)
        save_config(cfg, out / "config.yaml")
        write_atomic(out / "space.yaml", lambda p: p.write_text(yaml.safe_dump(to_dict(space), sort_keys=False)))
        log.info("search of %d trials, %d at a time, over %s; search folder %s", space.count, concurrent,
                 ", ".join(space.space), out)
        t0 = time.perf_counter()
        grid = tuner(search, concurrent).fit()
        table = results_table(search, grid)
        write_atomic(out / "results.csv", lambda p: table.to_csv(p, index=False))
        if not (table["status"] == "finished").any():
            raise TrainError(f"no trial of the search finished; see {out / 'results.csv'} and {out / 'trials'}")
        best = table.iloc[0]
        best_cfg = trial_config(cfg, next(r.config for r in grid if trial_name_of(r) == best["trial"]))
        best_yaml = save_config(best_cfg, out / "best.yaml")
        print_table(table, time.perf_counter() - t0)
        if parent is not None:
            parent.log_metrics({"best_fbeta": float(best[METRIC])})
            parent.set_tags({"best_trial": best["trial"]})
            parent.log_artifacts([out / "results.csv", best_yaml, out / "space.yaml"])
            parent.finish()
    return best_yaml


def print_table(table: pd.DataFrame, seconds: float) -> None:
    shown = table.assign(seconds=table["seconds"].map(lambda s: "" if math.isnan(s) else f"{s:.0f}"))
    log.info("search: %d trials in %.0f s, best first\n%s", len(table), seconds,
             shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
