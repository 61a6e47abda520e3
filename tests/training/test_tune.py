"""`planet-batch tune`: the search space's checks before Ray, and a search on demo data with Ray Tune (trials side
by side, ASHA stopping a bad one, a killed driver's search going on, the table, the best config, MLflow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snapshots import refused

from planet_batch.config import ConfigError, TrainConfig, from_dict, load_config, to_dict
from planet_batch.training.tune import SearchSpace, check_space, param_space, trial_config

STAGES = [{"name": "a", "size": 32, "epochs": 2, "frozen": True, "lr": 0.01},
          {"name": "b", "size": 32, "epochs": 2, "frozen": False, "lr": [1e-4, 1e-3]}]
TINY = ["arch=resnet18", "weights=none", "batch_size=8", "workers=1", "cpus_per_worker=0.5", "precision=fp32",
        f"stages={json.dumps(STAGES)}"]


def base(*extra) -> TrainConfig:
    return load_config(TrainConfig, None, [*TINY, *extra])


def space(**domains) -> SearchSpace:
    return from_dict(SearchSpace, {"space": {k.replace("__", "."): v for k, v in domains.items()}})


def test_a_trial_config_is_the_base_with_its_drawn_values_every_stage_at_once_with_a_star():
    cfg = trial_config(base(), {"stages.*.size": 48, "stages.1.lr": [1e-5, 2e-3], "dropout": 0.3})
    assert [st.size for st in cfg.stages] == [48, 48] and cfg.stages[1].lr == (1e-5, 2e-3)
    assert cfg.dropout == 0.3 and cfg.stages[0].lr == 0.01 and cfg.arch == "resnet18"


@pytest.mark.parametrize("domains, message", [
    ({"stages.2.lr": {"choice": [0.1]}}, "space: stages.2.lr: no '2' (the config has 2 stages)"),
    ({"nope": {"choice": [1]}}, "space: nope: unknown field; known: stages, arch,"),
    ({"dropout": {"uniform": [0.5, 0.2]}}, "space: dropout: uniform: expected [LO, HI] with LO < HI"),
    ({"dropout": {"uniform": [0.2, 1.5]}}, "space: dropout: input should be less than 1, got 1.5"),
    ({"stages.*.epochs": {"randint": [0, 3]}}, "space: stages.*.epochs: stages[0].epochs: input should be greater "
                                              "than 0, got 0"),
    ({"stages.0.lr": {"loguniform": [0, 0.1]}}, "space: stages.0.lr: loguniform: LO must be above 0"),
    ({"stages.0.epochs": {"randint": [1, 2.5]}}, "space: stages.0.epochs: randint: expected two integers"),
    ({"arch": {"choice": ["resnet34", "resnet99"]}}, "space: arch: unknown 'resnet99', choose one of"),
    ({"dropout": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "space: dropout: one of grid, choice, uniform, "
                                                           "loguniform, randint, got ['choice', 'uniform']"),
    ({"batch_size": {"grid": []}}, "space: batch_size: grid: expected a non-empty list"),
])
def test_every_value_a_space_can_draw_is_checked_against_the_config(domains, message):
    with pytest.raises(ConfigError) as e:
        check_space(base(), space(**{k.replace(".", "__"): v for k, v in domains.items()}))
    assert str(e.value).startswith(message), str(e.value)


def test_a_good_space_becomes_tunes_domains_with_both_ends_of_a_randint():
    from ray import tune

    good = space(arch={"grid": ["resnet18", "resnet34"]}, stages__0__epochs={"randint": [1, 3]},
                 stages__0__lr={"loguniform": [1e-3, 1e-1]}, batch_size={"choice": [8, 16]})
    check_space(base(), good)
    domains = param_space(good)
    assert domains["arch"] == {"grid_search": ["resnet18", "resnet34"]}
    assert isinstance(domains["stages.0.epochs"], tune.search.sample.Integer)
    assert (domains["stages.0.epochs"].lower, domains["stages.0.epochs"].upper) == (1, 4)  # upper exclusive
    assert domains["batch_size"].categories == [8, 16]


@pytest.mark.parametrize("text, message", [
    ("space: {}", "space: dictionary should have at least 1 item"),
    ("trials: 0\nspace: {dropout: {choice: [0.1]}}", "trials: input should be greater than or equal to 1"),
    ("space: {dropout: {normal: [0, 1]}}", "space: input should be 'grid', 'choice', 'uniform', 'loguniform' or "
                                          "'randint', got 'normal'"),
    ("space: [", "not valid YAML: expected the node content, but found '<stream end>' (line 1, column 9)"),
    ("space: {arch: {choice: [timm/efficientnet_lit0]}}", "timm has no model 'efficientnet_lit0'"),
])
def test_a_bad_search_space_is_one_line_exit_2_before_ray(demo_root, tmp_path, capsys, no_ray, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"stages": STAGES}))
    line = refused(tmp_path, capsys, "tune", "--config", config, "--space", path, "--data", demo_root,
                   "--out", tmp_path / "search", *[a for s in TINY[:-1] for a in ("--set", s)])
    assert message in line, line
    assert not (tmp_path / "search").exists()


def tune_argv(tmp_path: Path, demo_root: Path, space: dict, out: Path) -> list:
    config, path = tmp_path / "base.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(to_dict(base())))
    path.write_text(yaml.safe_dump(space))
    return ["tune", "--config", config, "--space", path, "--data", demo_root, "--out", out]


def test_a_folder_with_files_a_search_would_write_is_refused_and_left_alone(demo_root, tmp_path, capsys, no_ray):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "best.yaml").write_text("my own notes\n")
    (out / "results.csv").write_text("a,b\n")
    line = refused(tmp_path, capsys, *tune_argv(tmp_path, demo_root, SEARCH, out))
    assert line == (f"search folder {out} holds results.csv, best.yaml, not written by planet-batch (no run.json): "
                    "give another --out; nothing there is touched")


def test_a_search_folder_of_another_space_or_config_is_refused(demo_root, tmp_path, capsys, no_ray):
    from planet_batch.config import save_config
    from planet_batch.training.run_folder import mark_run_folder

    out = tmp_path / "search"
    mark_run_folder(out)  # a search folder, as a first run leaves it
    save_config(base(), out / "config.yaml")
    save_config(from_dict(SearchSpace, SEARCH), out / "space.yaml")
    other = {**SEARCH, "space": {"threshold": {"grid": [0.2, 0.5]}}}
    line = refused(tmp_path, capsys, *tune_argv(tmp_path, demo_root, other, out))
    assert line == (f"search folder {out} holds a search of another config (the search space): the same config "
                    "and space go on with it; give another --out")
    argv = tune_argv(tmp_path, demo_root, SEARCH, out)
    line = refused(tmp_path, capsys, *argv, "--set", "dropout=0.25")
    assert line.startswith(f"search folder {out} holds a search of another config (dropout: 0.5 -> 0.25)")


# ----------------------------------------------------------------------------------------------
# A search on a real local Ray, as a user runs it: killed once, then the same command again

# Three trials, two at a time on 2 CPUs (each one worker of half a CPU beside Ray Data's), validating with TTA. The
# third's validation F2 is near 0 by construction (threshold 0.99: it predicts almost no tag), so ASHA stops it at
# its first rung.
SEARCH = {"trials": 1, "grace_epochs": 1, "space": {"threshold": {"grid": [0.2, 0.3, 0.99]}}}
ROOT = Path(__file__).resolve().parents[2]


def tune_cli(config: Path, space: Path, data: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/tune.py", "--config", str(config), "--space", str(space),
                             "--data", str(data), "--out", str(out), "--experiment", "search"], cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def searched(demo_root, tmp_path_factory, mlflow_server):
    """The search's driver killed once its first trial has finished, then the same command again."""
    tmp = tmp_path_factory.mktemp("tune")
    config, space, out = tmp / "base.yaml", tmp / "space.yaml", tmp / "search"
    config.write_text(yaml.safe_dump(to_dict(base("valid_tta=true"))))
    space.write_text(yaml.safe_dump(SEARCH))
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    first = tune_cli(config, space, demo_root, out, env)
    deadline = time.monotonic() + 300
    while not list(out.glob("trials/*/export/model.json")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.5)
    (finished,) = out.glob("trials/*/export/model.json")
    kept = finished.stat().st_mtime_ns
    os.killpg(first.pid, signal.SIGKILL)
    first_console = first.communicate(timeout=60)[0]
    again = tune_cli(config, space, demo_root, out, env)
    console = again.communicate(timeout=600)[0]
    assert again.returncode == 0, console[-3000:]
    return {"out": out, "first": first_console, "console": console, "finished": finished, "kept": kept,
            "server": mlflow_server}


def test_a_search_ranks_its_trials_and_asha_stops_the_bad_one(searched):
    table = pd.read_csv(searched["out"] / "results.csv")
    assert sorted(table["trial"]) == ["trial-00", "trial-01", "trial-02"]
    by_threshold = table.set_index("threshold")
    # The bad trial starts third, when both others have passed the first rung: ASHA stops it at its first report
    # (epoch 1, or 2 when the driver was killed after its first epoch and the trial resumed). Of the two alike
    # trials side by side, the first at each rung goes on; the other may be stopped at a rung too.
    assert by_threshold.loc[0.99, "status"] == "stopped" and by_threshold.loc[0.99, "epochs"] in (1, 2)
    assert by_threshold.loc[0.99, "fbeta"] < 0.2 <= by_threshold.loc[[0.2, 0.3], "fbeta"].min()
    assert set(table["status"]) <= {"finished", "stopped"} and table.iloc[0]["status"] == "finished"
    finished = table[table["status"] == "finished"]
    assert list(finished["fbeta"]) == sorted(finished["fbeta"], reverse=True)  # best first
    for row in finished.itertuples():  # as the trial's own run folder has them
        epochs = pd.read_csv(searched["out"] / "trials" / row.trial / "metrics.csv")
        assert (row.epochs, row.fbeta) == (4, pytest.approx(epochs["fbeta"].iloc[-1]))
        assert row.seconds == pytest.approx(epochs["time"].sum(), abs=0.1)
    assert "search of 3 trials, 2 at a time, over threshold" in searched["first"]
    assert "search: 3 trials" in searched["console"] and "best first" in searched["console"]


def test_validation_with_tta_scores_what_score_tta_predicts(searched, demo_root):
    """valid_tta: a finished trial's last epoch F2 is its export's TTA prediction on its validation chips (the
    export holds the last epoch's weights), not the plain one."""
    from planet_batch.data.datasets import train_valid_split
    from planet_batch.export import load_export
    from planet_batch.training.folds import predict
    from planet_batch.training.metrics import fbeta

    table = pd.read_csv(searched["out"] / "results.csv")
    trial = searched["out"] / "trials" / table.iloc[0]["trial"]
    cfg, export = load_config(TrainConfig, trial / "config.yaml"), load_export(trial / "export")
    assert cfg.valid_tta
    _, valid = train_valid_split(demo_root, cfg.valid_pct, cfg.seed)
    last = pd.read_csv(trial / "metrics.csv")["fbeta"].iloc[-1]
    with_tta, plain = (fbeta(predict(export, valid, "fp32", tta=tta), valid.targets, cfg.threshold)
                       for tta in (True, False))
    assert with_tta == pytest.approx(last, abs=1e-4) and plain != pytest.approx(last, abs=1e-4), (last, plain)


def test_the_best_config_is_one_train_runs_as_is(searched):
    from planet_batch.cli import build_parser, train_config

    best = searched["out"] / "best.yaml"
    table = pd.read_csv(searched["out"] / "results.csv")
    cfg = train_config(build_parser().parse_args(["train", "--config", str(best), "--data", "d", "--out", "o"]))
    assert cfg == trial_config(base("valid_tta=true"), {"threshold": float(table.iloc[0]["threshold"])})
    trial = searched["out"] / "trials" / table.iloc[0]["trial"]
    assert load_config(TrainConfig, trial / "config.yaml") == cfg


def test_a_killed_search_goes_on_without_repeating_a_finished_trial(searched):
    assert searched["finished"].stat().st_mtime_ns == searched["kept"]
    assert "resuming the search" in searched["console"]
    table = pd.read_csv(searched["out"] / "results.csv")
    for trial in table[table["status"] == "finished"]["trial"]:  # each epoch once, resumed or not
        assert pd.read_csv(searched["out"] / "trials" / trial / "metrics.csv")["epoch"].tolist() == [0, 1, 0, 1]


def test_every_trial_is_a_run_nested_in_the_searchs(searched):
    server = searched["server"]
    runs = server.runs("search")
    (parent,) = [r for r in runs if r.data.tags.get("planet_batch.job") == "tune"]
    trials = [r for r in runs if r is not parent]
    assert len(trials) == 3 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    best = pd.read_csv(searched["out"] / "results.csv").iloc[0]
    assert parent.data.metrics["best_fbeta"] == pytest.approx(best["fbeta"])
    assert server.artifacts(parent.info.run_id) == ["best.yaml", "results.csv", "space.yaml"]
