import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from planet_batch.cli import main
from planet_batch.data.labels import read_labels


def test_demo_data_and_show_batch(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["demo-data", str(root), "--n-train", "12", "--n-test", "3", "--n-additional", "2", "--seed", "3"]) == 0
    assert len(read_labels(root / "train_v2.csv", image_dir=root / "train-jpg")) == 12
    out = tmp_path / "batch.png"
    assert main(["show-batch", "--data", str(root), "--out", str(out), "--rows", "2", "--size", "64"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300
    assert str(out) in capsys.readouterr().out


def test_bad_data_root_is_a_clean_error(tmp_path, capsys):
    assert main(["show-batch", "--data", str(tmp_path), "--out", str(tmp_path / "b.png")]) == 2
    assert "no train data" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Every command line in README.md and docs/*.md, extracted from the files so the docs cannot drift from the parser.

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def readme_commands() -> list[list[str]]:
    """`planet-batch ...` and `python jobs/...` lines of README.md and docs/*.md as argv lists for `main`.

    Code blocks and inline code spans that carry a flag; continuation lines are joined, comments
    dropped, `ray job submit ... --` prefixes cut, optional `[...]` parts kept, and each `a|b`
    alternative becomes a command line of its own.
    """
    text = "\n".join(p.read_text() for p in [README, *DOCS])
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    lines += [span for span in re.findall(r"`([^`\n]+)`", text) if " --" in span]
    commands = []
    for line in lines:
        line = line.split(" #")[0]
        m = re.search(r"(planet-batch|python jobs/(\w+)\.py) (.*)", line)
        if not m:
            continue
        sub = [] if m.group(1) == "planet-batch" else [m.group(2)]
        words = [w for w in shlex.split(m.group(3).replace("[", "").replace("]", "")) if w != "..."]
        variants = [[]]
        for w in words:
            options = w.split("|") if re.fullmatch(r"[\w.]+(\|[\w.]+)+", w) else [w]
            variants = [v + [o] for v in variants for o in options]
        commands += [sub + v for v in variants]
    return commands


def test_the_readme_documents_every_subcommand():
    used = {c[0] for c in readme_commands()}
    assert used >= {"train", "score", "lr-find", "lesson3", "show-batch", "check-submission", "download", "submit",
                    "demo-data", "import-weights"}, used


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_readme_command_parses_and_builds_its_config(argv, monkeypatch):
    from planet_batch.cli import ScoreConfig, build_parser, config_from_args, train_config

    monkeypatch.chdir(README.parent)  # config paths in the README are relative to the checkout
    args = build_parser().parse_args(argv)
    if args.command in ("train", "lr-find", "lesson3"):
        cfg = train_config(args)
        for name in ("workers", "cpus_per_worker", "storage", "gpu", "data_shared"):
            if getattr(args, name) is not None:
                assert getattr(cfg, name) == getattr(args, name)
    elif args.command == "score":
        cfg = config_from_args(ScoreConfig, args)
        if args.threshold is not None:
            assert cfg.threshold == args.threshold  # "0.2" and "tuned" alike, as text
        if args.out is not None:
            assert cfg.out == args.out


def test_flag_values_reach_the_config_as_typed_values(tmp_path):
    from planet_batch.cli import ScoreConfig, build_parser, config_from_args

    args = build_parser().parse_args(["score", "--model", "m", "--data", "d", "--threshold", "0.2", "--out", "2024",
                                      "--batch-size", "8", "--cpus-per-actor", "0.5", "--tta"])
    cfg = config_from_args(ScoreConfig, args)
    assert (cfg.threshold, cfg.out, cfg.batch_size, cfg.cpus_per_actor, cfg.tta) == ("0.2", "2024", 8, 0.5, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--model", "m", "--data", "d", "--batch-size", "eight"])


def documented_score_forms() -> list[list[str]]:
    """README score command lines that together use every documented flag (and `--threshold tuned`): the fewest,
    chosen greedily. (Every README command also parses into its config: the test above.)"""
    def words(argv):
        return {w for w in argv if w.startswith("--") or w == "tuned"}

    forms = [argv for argv in readme_commands() if argv[0] == "score"]
    left, chosen = set().union(*map(words, forms)), []
    while left:
        best = max(forms, key=lambda argv: len(words(argv) & left))
        chosen.append(best)
        left -= words(best)
    return chosen


@pytest.mark.ray
@pytest.mark.parametrize("argv", documented_score_forms(), ids=" ".join)
def test_every_documented_score_form_runs_on_demo_data(argv, ray_local, demo_root, tmp_path, capsys):
    """Paths swapped for the demo data and a local output; `--gpus-per-actor` dropped (no GPU here)."""
    from reference import tiny_export

    from planet_batch.data.submission import check_submission

    where = {"--model": str(tiny_export(tmp_path / "export")), "--data": str(demo_root),
             "--images": str(demo_root / "test-jpg"), "--out": str(tmp_path / "out.csv"),
             "--probs-out": str(tmp_path / "probs.parquet"), "--work-dir": str(tmp_path / "parts")}
    args, skip = [], False
    for i, word in enumerate(argv):
        if skip or word == "--gpus-per-actor":
            skip = not skip
        else:
            args.append(where.get(argv[i - 1], word) if i else word)
    assert main(args) == 0, capsys.readouterr().err
    sample = demo_root / "sample_submission_v2.csv" if "--data" in args else None
    assert check_submission(tmp_path / "out.csv", sample) == []


@pytest.mark.parametrize("argv, message", [
    (["check-submission", "{tmp}/sub.csv", "--sample", "{tmp}/missing.csv"], "missing.csv: cannot read"),
    (["lesson3", "--config", "jobs/configs/demo.yaml", "--data", "{tmp}/nothing", "--out", "{tmp}/run"],
     "is not a directory"),
    (["score", "--model", "{tmp}", "--data", "{tmp}", "--threshold", "0.2x"], "neither a number nor 'tuned'"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(README.parent)
    (tmp_path / "sub.csv").write_text("image_name,tags\ntest_0,clear\n")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.parametrize("sig,folds", [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
                         ids=["SIGTERM-one-run", "SIGINT-2-folds"])
def test_a_stopped_training_ends_at_once_with_one_line(demo_root, tmp_path, sig, folds):
    """SIGTERM (a scheduler's stop) or Ctrl-C mid-epoch: exit 143 / 130 within seconds, one line, no traceback,
    no export. Two folds side by side wait inside Ray Train's fit in threads, which only a main-thread handler
    can abort: Ctrl-C used to wait for every fold to finish."""
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"arch": "resnet18", "weights": "none", "batch_size": 8, "workers": 1,
                                  "cpus_per_worker": 0.5, "precision": "fp32",
                                  "stages": [{"name": "s", "size": 32, "epochs": 20, "frozen": False, "lr": 0.01}]}))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not this process's
    argv = [sys.executable, "jobs/train.py", "--config", config, "--data", demo_root, "--out", run]
    proc = subprocess.Popen([*argv, *(["--folds", str(folds), "--parallel-folds", "2"] if folds else [])],
                            cwd=README.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    row = re.compile(r"planet_batch\.training\.train: (fold-\d)? *\d+ +\d\.\d+ ")  # an epoch row of the table
    deadline = time.monotonic() + 240
    while len({m[1] for m in map(row.search, list(lines)) if m}) < max(1, folds):  # every fold is training
        assert proc.poll() is None and time.monotonic() < deadline, (proc.returncode, "".join(lines)[-3000:])
        time.sleep(0.2)
    proc.send_signal(sig)
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 128 + sig
    assert time.monotonic() - t0 < 20  # 20 epochs take minutes
    reader.join(timeout=10)
    said = "stopped (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    after = "".join(lines).rsplit(" 0.", 1)[-1]  # from the last epoch row on
    assert lines[-1] == f"planet-batch train: {said}\n" and "Traceback" not in after, after
    assert not (run / "export").exists() and not (run / "oof.parquet").exists()
