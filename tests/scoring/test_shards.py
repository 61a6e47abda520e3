"""The scoring work folder without Ray: what it adopts, refuses, removes, and takes from an earlier run."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from reference import tiny_export
from snapshots import refused, snapshot

import planet_batch.scoring.score as scoring
from planet_batch.cluster.storage import locate
from planet_batch.config import ScoreConfig
from planet_batch.data.labels import TAGS
from planet_batch.scoring.predictor import load_ensemble
from planet_batch.scoring.shards import CREATED, WorkFolder, WorkFolderError

RUN = {"models": ["abc"], "size": 32}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export") / "export")


def scratch_disk(tmp_path):
    """A scratch folder holding other jobs' folders only (no file directly in it) and one with files."""
    scratch = tmp_path / "scratch"
    (scratch / "other-job" / "shards").mkdir(parents=True)
    (scratch / "other-job" / "shards" / "part-0.parquet").write_bytes(b"another job's rows")
    (scratch / "empty-folder").mkdir()
    return scratch


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("how", ["flags", "config"])
def test_a_folder_that_is_not_a_work_folder_is_refused_and_kept_byte_for_byte(demo_root, export, tmp_path, capsys,
                                                                             no_ray, overwrite, how):
    scratch = scratch_disk(tmp_path)
    out = tmp_path / "submission.csv"
    args = ["score", "--model", export, "--data", demo_root]
    if how == "flags":
        args += ["--out", out, "--work-dir", scratch, *(["--overwrite"] if overwrite else [])]
    else:  # a score config YAML can set both
        config = tmp_path / "score.yaml"
        config.write_text(yaml.safe_dump({"out": str(out), "work_dir": str(scratch), "overwrite": overwrite}))
        args += ["--config", config]
    assert refused(tmp_path, capsys, *args) == (
        f"work folder {scratch} exists and is not one (no scoring run.json; it holds empty-folder and 1 more): give "
        "another --work-dir, nothing there is touched")


def test_a_new_folder_is_made_marked_and_removed_after_success_an_empty_given_one_stays(tmp_path):
    made = WorkFolder.open(str(tmp_path / "new"), RUN, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [CREATED, "commits", "run.json", "shards"]
    made.remove()
    assert not (tmp_path / "new").exists()

    (tmp_path / "given").mkdir()
    given = WorkFolder.open(str(tmp_path / "given"), RUN, overwrite=False)
    assert not (tmp_path / "given" / CREATED).exists()
    given.remove()
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())


def test_overwrite_and_remove_take_only_what_scoring_wrote(tmp_path):
    """A file someone put into a work folder (or a resumed run's folder) is never deleted with it."""
    root = tmp_path / "work"
    work = WorkFolder.open(str(root), RUN, overwrite=False)
    (root / "shards" / "x-0.parquet").write_bytes(b"rows")
    (root / "notes.txt").write_text("mine")
    WorkFolder.open(str(root), {**RUN, "size": 64}, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [CREATED, "commits", "notes.txt", "run.json", "shards"]
    assert not any((root / "shards").iterdir())
    work.remove()
    assert sorted(p.name for p in root.iterdir()) == [CREATED, "notes.txt"]


def test_a_training_run_folder_is_no_work_folder_even_with_overwrite(tmp_path):
    """Training's run folder holds a run.json too (its run id): never taken for a work folder."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "run.json").write_text('{"run_id": "0123456789ab"}')
    (run / "export" / "model.pt").write_bytes(b"weights")
    before = snapshot(tmp_path)
    with pytest.raises(WorkFolderError, match="exists and is not one \\(no scoring run.json; it holds export and 1"):
        WorkFolder.open(str(run), RUN, overwrite=True)
    assert snapshot(tmp_path) == before


def test_rows_of_another_run_are_refused_and_a_file_is_no_folder(tmp_path):
    WorkFolder.open(str(tmp_path / "w"), RUN, overwrite=False)
    with pytest.raises(WorkFolderError, match="its rows were scored with another input size; rerun"):
        WorkFolder.open(str(tmp_path / "w"), {**RUN, "size": 64}, overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(WorkFolderError, match="is a file"):
        WorkFolder.open(str(tmp_path / "f"), RUN, overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


def test_a_rerun_with_another_model_size_or_tta_is_refused_and_overwrite_starts_over(export, demo_root, tmp_path):
    """What the rows were computed with (score.open_work_folder): the weights, input size and TTA must match."""
    other = tiny_export(tmp_path / "other", 64)

    def reopen(model, **kw):
        cfg = ScoreConfig(model=(str(model),), data=str(demo_root), out=str(tmp_path / "s.csv"), **{"tta": False, **kw})
        ensemble = load_ensemble(cfg.model)
        weights = [m.weights.read_bytes() for m in ensemble.members]
        return scoring.open_work_folder(cfg, locate(cfg.out), ensemble, weights, scoring.expected_images(cfg))

    work = reopen(export)
    shard(work, "a", ["test_0"])
    assert reopen(export).recover() == {"/d/test_0.jpg"}  # the same run resumes
    with pytest.raises(WorkFolderError, match=rf"^work folder {work.root}: its rows were scored with another --model "
                                              r"and input size; rerun with the same ones to resume, or pass "
                                              r"--overwrite to start over$"):
        reopen(other)
    with pytest.raises(WorkFolderError, match="its rows were scored with another --tta;"):
        reopen(export, tta=True)
    assert reopen(other, overwrite=True).recover() == set()  # emptied: every image is scored again


def shard(work: WorkFolder, task: str, names: list[str], ids: list[str] | None = None, pending: bool = False) -> None:
    """A write task's shard and its commit, as Ray Data's two-phase commit leaves them."""
    probs = np.full((len(names), len(TAGS)), 0.5, np.float32)
    pq.write_table(pa.table({"path": [f"/d/{n}.jpg" for n in names], "image_name": names,
                             **{t: probs[:, j] for j, t in enumerate(TAGS)}, "ok": [True] * len(names),
                             "error": [""] * len(names)}), f"{work.shards.path}/{task}-0.parquet")
    ids = [f"/d/{n}.jpg" for n in names] if ids is None else ids
    suffix = ".pending.parquet" if pending else ".parquet"
    pq.write_table(pa.table({"path": ids}), f"{work.commits.path}/{task}{suffix}")


def test_recovery_keeps_whole_shards_and_rescores_pending_short_and_unreadable_ones(tmp_path, caplog):
    work = WorkFolder.open(str(tmp_path / "w"), RUN, overwrite=False)
    shard(work, "a", ["test_0", "test_1"])
    shard(work, "b", ["test_2", "test_3"], pending=True)  # interrupted between the shard and the rename
    shard(work, "c", ["test_4"], ids=["/d/test_4.jpg", "/d/test_5.jpg"])  # a shard missing a row of its commit
    shard(work, "d", ["test_6"])
    (tmp_path / "w" / "shards" / "d-0.parquet").write_bytes(b"PAR1 cut short")
    with caplog.at_level(logging.WARNING):
        done = work.recover()
    assert done == {"/d/test_0.jpg", "/d/test_1.jpg"}
    assert sorted(p.name for p in (tmp_path / "w" / "shards").iterdir()) == ["a-0.parquet"]
    assert sorted(p.name for p in (tmp_path / "w" / "commits").iterdir()) == ["a.parquet"]
    assert "1 shard files with 1 rows for 2 ids" in caplog.text
    assert caplog.text.count("its images will be scored again") == 2
