"""Batch scoring end to end on a real local Ray (2 CPUs)."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from reference import plain_probs, tiny_export

from planet_batch.cluster.runtime import fault_file
from planet_batch.config import ScoreConfig
from planet_batch.data.demo_data import write_demo_data
from planet_batch.data.labels import TAGS, decode
from planet_batch.data.layout import LayoutError, read_sample_submission
from planet_batch.data.submission import check_submission
from planet_batch.export import ExportError, ExportMeta, load_export, save_export
from planet_batch.model import build_model, normalization
from planet_batch.scoring.score import ScoreError, run_scoring

pytestmark = pytest.mark.ray
SIZE = 32
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export of an untrained resnet18 whose head gives a spread of probabilities around 0.2."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAGS)).eval()
    thresholds = np.linspace(0.1, 0.5, len(TAGS))
    return save_export(tmp_path_factory.mktemp("export") / "export", model.state_dict(), ExportMeta(
        arch="resnet18", tags=TAGS, size=SIZE, normalize=normalization("resnet18"), threshold=0.2,
        thresholds=thresholds))


def read_rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def score(tmp_path, export_dir, **kw):
    kw.setdefault("out", str(tmp_path / "submission.csv"))
    kw.setdefault("precision", "fp32")  # compared with the fp32 plain loop; bf16 has its own test
    kw.setdefault("batch_size", 8)
    kw.setdefault("tta", False)  # compared with the plain loop's one view; TTA has its own test
    return run_scoring(ScoreConfig(model=str(export_dir), **kw))


def test_submission_is_complete_ordered_and_matches_a_plain_loop(ray_local, demo_root, export_dir, tmp_path):
    summary = score(tmp_path, export_dir, data=str(demo_root), probs_out=str(tmp_path / "probs.parquet"))
    out = tmp_path / "submission.csv"
    sample = demo_root / "sample_submission_v2.csv"
    assert check_submission(out, sample) == []
    rows = read_rows(out)
    names = [r[0] for r in rows[1:]]
    assert names == read_sample_submission(sample) and len(names) == 40

    probs = pq.read_table(tmp_path / "probs.parquet").to_pandas()
    assert list(probs["image_name"]) == names and list(probs.columns[1:]) == list(TAGS)
    matrix = probs[list(TAGS)].to_numpy()
    assert [r[1] for r in rows[1:]] == decode(matrix, 0.2)
    paths = [demo_root / ("test-jpg" if n.startswith("test_") else "test-jpg-additional") / f"{n}.jpg" for n in names]
    np.testing.assert_allclose(matrix, plain_probs(export_dir, paths, SIZE), atol=1e-5)

    saved = json.loads((tmp_path / "score_summary.json").read_text())
    assert saved["images"] == saved["scored"] == 40 and saved["unreadable"] == 0
    assert saved["images_per_s"] > 0 and summary.wall_s > 0


# bf16 vs fp32 probabilities. Measured on a resnet18@128 trained on the real chips (bench/precision_quality.py):
# six exports (3 seeds x fp32/bf16-trained), 840 held-out chips: at most 0.0166 apart, decisions agreeing on
# 99.93% of (image, tag) pairs at 0.2; docs/precision.md states 0.02.
BF16_MAX_ABS_DIFF = 0.02


def test_bf16_compiled_scoring_agrees_with_the_fp32_plain_loop(ray_local, demo_root, export_dir, tmp_path):
    """--precision bf16 --compile on (short batches padded to the compiled shape): the probabilities stay within
    the stated bound of fp32 eager, the decisions agree on >= 99.5% of (image, tag) pairs, and the run says how
    it ran."""
    summary = score(tmp_path, export_dir, data=str(demo_root), probs_out=str(tmp_path / "probs.parquet"),
                    precision="bf16", compile="on", batch_size=16)
    assert (summary.precision, summary.compiled) == ("bf16", True)
    probs = pq.read_table(tmp_path / "probs.parquet").to_pandas()
    names = list(probs["image_name"])
    paths = [demo_root / ("test-jpg" if n.startswith("test_") else "test-jpg-additional") / f"{n}.jpg" for n in names]
    bf16, fp32 = probs[list(TAGS)].to_numpy(), plain_probs(export_dir, paths, SIZE)
    assert 0 < np.abs(bf16 - fp32).max() <= BF16_MAX_ABS_DIFF  # (0: it did not run in bf16 at all)
    assert ((bf16 > 0.2) == (fp32 > 0.2)).mean() >= 0.995
    saved = json.loads((tmp_path / "score_summary.json").read_text())
    assert (saved["precision"], saved["compiled"]) == ("bf16", True)


def test_tuned_thresholds_tta_and_an_image_folder(ray_local, demo_root, export_dir, tmp_path):
    folder = demo_root / "test-jpg"
    score(tmp_path, export_dir, images=str(folder), threshold="tuned", tta=True,
          probs_out=str(tmp_path / "p.parquet"))
    rows = read_rows(tmp_path / "submission.csv")[1:]
    assert [r[0] for r in rows] == [f"test_{i}" for i in range(24)]
    matrix = pq.read_table(tmp_path / "p.parquet").to_pandas()[list(TAGS)].to_numpy()
    expected = plain_probs(export_dir, [folder / f"{r[0]}.jpg" for r in rows], SIZE, tta=True)
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
    assert [r[1] for r in rows] == decode(matrix, np.asarray(load_export(export_dir).thresholds))


@pytest.fixture
def broken_root(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    good = (root / "test-jpg" / "test_1.jpg").read_bytes()
    (root / "test-jpg" / "test_1.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (root / "test-jpg" / "test_2.jpg").write_bytes(b"")  # zero bytes
    (root / "test-jpg-additional" / "file_3.jpg").write_text("not a jpeg")
    return root


def test_unreadable_images_get_empty_tags_and_are_listed(ray_local, broken_root, export_dir, tmp_path):
    summary = score(tmp_path, export_dir, data=str(broken_root))
    assert summary.unreadable == 3 and summary.scored == 37
    rows = {r[0]: r[1] for r in read_rows(tmp_path / "submission.csv")[1:]}
    assert len(rows) == 40 and rows["test_1"] == rows["test_2"] == rows["file_3"] == ""
    bad = read_rows(tmp_path / "bad_images.csv")
    assert bad[0] == ["image_name", "error"] and sorted(r[0] for r in bad[1:]) == ["file_3", "test_1", "test_2"]


def test_strict_fails_without_writing_a_submission(ray_local, broken_root, export_dir, tmp_path):
    with pytest.raises(ScoreError, match="3 unreadable images"):
        score(tmp_path, export_dir, data=str(broken_root), strict=True)
    assert not (tmp_path / "submission.csv").exists()
    assert (tmp_path / "bad_images.csv").exists()


def test_existing_output_needs_overwrite(ray_local, demo_root, export_dir, tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("previous\n")
    with pytest.raises(ScoreError, match="--overwrite"):
        score(tmp_path, export_dir, data=str(demo_root))
    assert out.read_text() == "previous\n"
    score(tmp_path, export_dir, images=str(demo_root / "test-jpg-additional"), overwrite=True)
    assert len(read_rows(out)) == 17


def test_killed_actor_loses_and_duplicates_nothing(ray_local, demo_root, export_dir, tmp_path):
    point = "score:batch:2"  # the first actor to reach its third batch dies
    fault_file(ray_local, point).touch()
    score(tmp_path, export_dir, data=str(demo_root))
    assert fault_file(ray_local, point, "fired").exists(), "the fault never fired"
    assert check_submission(tmp_path / "submission.csv", demo_root / "sample_submission_v2.csv") == []


def test_bad_model_or_data_fail_before_ray_work(demo_root, export_dir, tmp_path, monkeypatch):
    import planet_batch.scoring.score as scoring

    monkeypatch.setattr(scoring, "ensure_ray", lambda: pytest.fail("Ray was started for a job that cannot run"))
    with pytest.raises(ExportError, match="model.json is missing"):
        score(tmp_path, tmp_path, data=str(demo_root))
    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    meta = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ExportError, match="version 99 is not supported"):
        score(tmp_path, old, data=str(demo_root))
    for field, value, message in [("size", "big", "size: input should be a valid integer"),
                                  ("normalize", {"mean": [0.5] * 3}, "normalize.std: required field is missing"),
                                  ("thresholds", [0.2], "1 thresholds for 17 tags")]:
        (old / "model.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(ExportError, match=re.escape(f"{old / 'model.json'}: {message}")):
            score(tmp_path, old, data=str(demo_root))
    with pytest.raises(LayoutError, match="no test data"):
        score(tmp_path, export_dir, data=str(tmp_path))


def test_shards_are_committed_while_the_images_are_scored_not_all_at_the_end(ray_local, tmp_path):
    """What an interrupted run keeps is what was committed. Ray Data once left the write tasks unplaced beside the
    read tasks and the actors on 2 cores until every image was predicted: all shards in the run's last 0.2 s."""
    from bench.score_throughput import make_images

    make_images(tmp_path / "images", 2000)
    (tmp_path / "out").mkdir()
    t0 = time.time()
    run_scoring(ScoreConfig(model=str(tiny_export(tmp_path / "export", size=32)), images=str(tmp_path / "images"),
                            out=str(tmp_path / "out" / "submission.csv"), shard_rows=250, keep_parts=True,
                            precision="fp32", tta=False))
    commits = sorted(p.stat().st_mtime - t0 for p in (tmp_path / "out" / "submission.csv.parts" / "commits").glob(
        "*.parquet"))
    assert len(commits) >= 5 and commits[-1] - commits[0] > 0.2 * commits[-1], [round(t, 1) for t in commits]


@pytest.fixture(scope="module")
def many_root(tmp_path_factory):
    """750 demo test chips in the Kaggle layout (15 shards of 50 rows)."""
    return write_demo_data(tmp_path_factory.mktemp("many") / "data", n_train=1, n_test=500, n_additional=250, seed=2)


@pytest.fixture(scope="module")
def export64(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export64") / "export", size=64)


def score_cmd(export, data, out, *extra):
    return [sys.executable, "jobs/score.py", "--model", str(export), "--data", str(data), "--out", str(out),
            "--batch-size", "16", "--shard-rows", "50", "--precision", "fp32", *extra]


def run_cli(cmd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def committed_rows(work: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (work / "commits").glob("*.parquet")
               if not p.name.endswith(".pending.parquet"))


def settled(count, quiet_s: float = 2.0, timeout: float = 60.0) -> int:
    """`count()` once it has not changed for `quiet_s`."""
    last, since, deadline = count(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"still changing after {timeout} s"
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.fixture(scope="module")
def uninterrupted(many_root, export64, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "submission.csv"
    done = run_cli(score_cmd(export64, many_root, out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out.parent / "submission.csv.parts").exists()  # removed after success
    return out.read_bytes()


def test_interrupted_scoring_resumes_where_it_stopped(many_root, export64, uninterrupted, tmp_path):
    """The driver stopped by a scheduler (SIGTERM: the path of Ctrl-C too) once its first shards are in: no
    submission; the same command again scores only the rest and writes the same bytes. (A driver killed outright
    leaves pending commits: test_shards' recovery test, and the cluster's lost head node, test_cluster.)

    Interrupted early: the tasks Ray Data had started may still commit while the driver shuts down (once, on a
    loaded CI machine, all of the 800 rows left after an interruption at 700)."""
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    work = out.parent / "submission.csv.parts"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(score_cmd(export64, many_root, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while committed_rows(work) == 0 if work.exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "scoring ended before the interruption"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-2000:]
    assert not out.exists()
    # one line saying so, after where the shards are kept; no traceback
    assert stderr.splitlines()[-1] == "planet-batch score: stopped (SIGTERM)" and "Traceback" not in stderr, \
        stderr[-2000:]
    assert f"the shards written so far are kept in {work}: the same command resumes" in stderr
    kept = settled(lambda: committed_rows(work))  # the dead driver's Ray finishes or drops the writes it started

    done = run_cli(score_cmd(export64, many_root, out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming: " in done.stderr and f"{kept} of 750 images already scored" in done.stderr
    summary = json.loads((out.parent / "score_summary.json").read_text())
    # Nothing committed is scored again or lost: the rerun computes exactly the rows that had no shard.
    assert 0 < summary["resumed_images"] == kept < 750
    assert summary["scored_images"] == 750 - kept and summary["images"] == 750
    assert out.read_bytes() == uninterrupted
    assert not work.exists()


def test_thresholds_change_without_rescoring_and_a_corrupt_shard_is_rescored(ray_local, demo_root, export_dir,
                                                                              tmp_path, caplog):
    out = tmp_path / "submission.csv"
    score(tmp_path, export_dir, data=str(demo_root), keep_parts=True, shard_rows=10, probs_out=str(tmp_path / "p.pq"))
    first = out.read_bytes()
    probs = pq.read_table(tmp_path / "p.pq").to_pandas()[list(TAGS)].to_numpy()
    out.unlink()
    summary = score(tmp_path, export_dir, data=str(demo_root), keep_parts=True, shard_rows=10, threshold="tuned")
    assert summary.resumed_images == 40 and summary.scored_images == 0
    assert [r[1] for r in read_rows(out)[1:]] == decode(probs, np.asarray(load_export(export_dir).thresholds))

    shard = sorted((tmp_path / "submission.csv.parts" / "shards").glob("*.parquet"))[1]
    rows_in_shard = pq.ParquetFile(shard).metadata.num_rows
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    out.unlink()
    summary = score(tmp_path, export_dir, data=str(demo_root), shard_rows=10)
    assert summary.scored_images == rows_in_shard and summary.resumed_images == 40 - rows_in_shard
    assert f"shard {shard} is unreadable" in caplog.text
    assert out.read_bytes() == first
    assert not (tmp_path / "submission.csv.parts").exists()


def test_ensemble_members_must_agree_and_the_work_folder_must_be_writable(demo_root, export_dir, export64, tmp_path):
    bad = run_cli([*score_cmd(export_dir, demo_root, tmp_path / "s.csv"), "--model", str(export64)])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        f"planet-batch score: error: --model {export64} takes 64px images, --model {export_dir} {SIZE}px: "
        "an ensemble decodes each image once, at one size")
    (tmp_path / "file").write_text("x")
    bad = run_cli(score_cmd(export_dir, demo_root, tmp_path / "s.csv", "--work-dir", str(tmp_path / "file" / "w")))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("planet-batch score: error: work folder: cannot write to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_stall_fails_loudly_keeps_the_shards_and_a_rerun_resumes(ray_local, demo_root, export_dir, tmp_path):
    """The only predictor actor hangs at its fourth batch (a cluster that cannot place the work looks the same to
    the driver: nothing moves): after --stall-timeout, Ray Data's no-progress guard ends the run with our one-line
    error, no submission, the committed shards kept; the same call again resumes from them and finishes. (The
    limit counts from the start too: the actor's start-up must fit in it.)"""
    out = tmp_path / "submission.csv"
    fault_file(ray_local, "score:batch:3", "hang").touch()
    kw = {"data": str(demo_root), "actors": 1, "shard_rows": 8, "stall_timeout_s": 30.0}
    with pytest.raises(ScoreError) as stalled:
        score(tmp_path, export_dir, **kw)
    assert fault_file(ray_local, "score:batch:3", "hanging").exists()
    assert str(stalled.value).startswith("no new shard in 30 s (") and "rerun" in str(stalled.value), stalled.value
    assert not out.exists()
    kept = committed_rows(tmp_path / "submission.csv.parts")
    assert 0 < kept < 40, kept

    summary = score(tmp_path, export_dir, **kw)
    assert summary.resumed_images == kept and summary.scored_images == 40 - kept
    assert check_submission(out, demo_root / "sample_submission_v2.csv") == []
