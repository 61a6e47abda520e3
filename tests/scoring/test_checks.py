"""What `planet-batch score` checks before any work, without Ray: each refusal is one line, exit 2, and every
file that was there stays byte for byte."""

import shutil

import pytest
from reference import tiny_export
from snapshots import refused

import planet_batch.scoring.score as scoring

pytestmark = pytest.mark.usefixtures("no_ray")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture
def data(demo_root, tmp_path):
    """The demo data's test half, a copy this test may change."""
    root = tmp_path / "data"
    for part in ("test-jpg", "test-jpg-additional"):
        shutil.copytree(demo_root / part, root / part)
    shutil.copy(demo_root / "sample_submission_v2.csv", root)
    return root


def test_the_sample_submissions_names_must_match_the_images_once_each(export, data, tmp_path, capsys):
    sample = data / "sample_submission_v2.csv"
    rows = sample.read_text().splitlines()
    score = ("--model", export, "--data", data, "--out", tmp_path / "s.csv")
    sample.write_text("\n".join([*rows, rows[5]]) + "\n")
    assert refused(tmp_path, capsys, "score", *score) == (
        f"{sample}:{len(rows) + 1}: image test_4 is listed twice (first on line 6)")
    sample.write_text("\n".join([*rows, "test_999,clear"]) + "\n")
    assert refused(tmp_path, capsys, "score", *score) == (
        f"1 images of the sample submission are not in {data / 'test-jpg'}, {data / 'test-jpg-additional'}, "
        "first: ['test_999']")
    sample.write_text("\n".join(r for r in rows if not r.startswith("test_3,")) + "\n")
    assert refused(tmp_path, capsys, "score", *score) == (
        f"1 test images are not in the sample submission {sample}, first: ['test_3']")


def test_a_folder_among_the_test_images_is_refused_and_other_files_are_skipped(export, data, tmp_path, capsys):
    (data / "test-jpg" / "notes.txt").write_text("not an image")
    (data / "test-jpg" / "thumbs").mkdir()
    (data / "test-jpg" / "thumbs" / "test_0.jpg").write_bytes((data / "test-jpg" / "test_0.jpg").read_bytes())
    assert refused(tmp_path, capsys, "score", "--model", export, "--data", data, "--out", tmp_path / "s.csv") == (
        f"{data / 'test-jpg' / 'thumbs'} is a folder inside the image folder {data / 'test-jpg'}: images are the "
        ".jpg files directly in it; move it out")
    images = ("--model", export, "--images", data / "test-jpg", "--out", tmp_path / "s.csv")
    assert refused(tmp_path, capsys, "score", *images).startswith(f"{data / 'test-jpg' / 'thumbs'} is a folder inside")
    shutil.rmtree(data / "test-jpg" / "thumbs")
    # The .txt is skipped, and the one rule is the read's too: the scoring reads exactly the checked list
    inputs = scoring.expected_images(scoring.ScoreConfig(model=(str(export),), data=str(data)))
    assert len(inputs.files) == 40 and all(f.name.endswith(".jpg") for f in inputs.files)


def test_every_output_is_checked_before_any_work(export, data, tmp_path, capsys):
    score = ("--model", export, "--data", data, "--out", tmp_path / "s.csv")
    (tmp_path / "probs.parquet").write_bytes(b"someone's probabilities")
    assert refused(tmp_path, capsys, "score", *score, "--probs-out", tmp_path / "probs.parquet") == (
        f"{tmp_path / 'probs.parquet'} exists; pass --overwrite to replace it")
    (tmp_path / "a-file").write_text("x")
    assert refused(tmp_path, capsys, "score", *score, "--probs-out", tmp_path / "a-file" / "p.parquet") == (
        f"cannot write to {tmp_path / 'a-file'}")
    assert refused(tmp_path, capsys, "score", *score, "--probs-out", tmp_path / "score_summary.json") == (
        f"--probs-out {tmp_path / 'score_summary.json'} is one of the run's other outputs ({tmp_path / 's.csv'} and "
        "next to it score_summary.json, bad_images.csv); give it another name")
    (tmp_path / "bad_images.csv").mkdir()
    assert refused(tmp_path, capsys, "score", *score) == (
        f"{tmp_path / 'bad_images.csv'} is a folder; the output is a file")
