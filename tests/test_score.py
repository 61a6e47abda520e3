"""Batch scoring end to end on a real local Ray (2 CPUs)."""

import csv
import json
import os
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
from reference import plain_probs

from planet_batch.config import ScoreConfig
from planet_batch.export import ExportError, load_export, save_export
from planet_batch.labels import TAGS, decode
from planet_batch.layout import LayoutError, read_sample_submission
from planet_batch.model import build_model
from planet_batch.runtime import fault_file
from planet_batch.score import ScoreError, run_scoring
from planet_batch.submission import check_submission
from planet_batch.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.ray
SIZE = 32


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export of an untrained resnet18 whose head gives a spread of probabilities around 0.2."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAGS)).eval()
    thresholds = np.linspace(0.1, 0.5, len(TAGS))
    return save_export(
        tmp_path_factory.mktemp("export") / "export", model.state_dict(), arch="resnet18", tags=TAGS, size=SIZE,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=0.2, thresholds=thresholds, dropout=0.5, config={},
        metrics={},
    )


def read_rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def score(tmp_path, export_dir, **kw):
    kw.setdefault("out", str(tmp_path / "submission.csv"))
    return run_scoring(ScoreConfig(model=str(export_dir), batch_size=8, **kw))


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


def test_bad_model_or_data_fail_before_ray_work(demo_root, export_dir, tmp_path):
    with pytest.raises(ExportError, match="model.json is missing"):
        score(tmp_path, tmp_path, data=str(demo_root))
    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    meta = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ExportError, match="version 99 is not supported"):
        score(tmp_path, old, data=str(demo_root))
    with pytest.raises(LayoutError, match="no test data"):
        score(tmp_path, export_dir, data=str(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_scoring_leaves_no_partial_file_and_a_rerun_matches(demo_root, export_dir, tmp_path, sig):
    """The driver stopped mid-run (Ctrl-C, or a scheduler's SIGTERM): nothing half-written; the rerun is complete."""
    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted((demo_root / "test-jpg").glob("*.jpg"))
    for i in range(600):
        shutil.copyfile(sources[i % len(sources)], folder / f"test_{i}.jpg")
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    cmd = [sys.executable, "jobs/score.py", "--model", str(export_dir), "--images", str(folder), "--out", str(out),
           "--batch-size", "8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = ""
    for line in proc.stdout:  # interrupt once images are flowing through the pipeline
        log += line
        if "scoring 600 images" in line:
            time.sleep(4)
            proc.send_signal(sig)
            break
    log += proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, log[-2000:]
    assert list(out.parent.iterdir()) == [], log[-2000:]

    done = subprocess.run([*cmd, "--overwrite"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)[1:]
    names = [f"test_{i}" for i in range(600)]
    assert [r[0] for r in rows] == names
    # The rerun is the complete, deterministic answer: what the plain loop gives for the same images.
    assert [r[1] for r in rows] == decode(plain_probs(export_dir, [folder / f"{n}.jpg" for n in names], SIZE), 0.2)


class _Stuck:
    """A stand-in dataset: one batch, then nothing (as when a cluster cannot place the work) or an error."""

    def __init__(self, then):
        self.then = then

    def iter_batches(self, **kw):
        yield {"name": np.array(["a"])}
        if self.then == "hang":
            time.sleep(60)
        raise RuntimeError("a Ray task failed")


def test_a_stalled_stream_fails_loudly_and_stream_errors_surface():
    from planet_batch.score import batches_or_stall

    t0 = time.perf_counter()
    with pytest.raises(ScoreError, match=r"no scored batch in 0.3 s \(1 of 9 images scored\)"):
        for _ in batches_or_stall(_Stuck("hang"), 0.3, lambda: "1 of 9 images scored"):
            pass
    assert time.perf_counter() - t0 < 5
    with pytest.raises(RuntimeError, match="a Ray task failed"):
        list(batches_or_stall(_Stuck("fail"), 30, str))
