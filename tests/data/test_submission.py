import pytest

from planet_batch.cli import main
from planet_batch.data.submission import check_submission, write_submission


@pytest.fixture
def sample(tmp_path):
    p = tmp_path / "sample.csv"
    p.write_text("image_name,tags\ntest_0,clear\ntest_1,clear\nfile_0,clear\n")
    return p


def test_good_submission_passes(tmp_path, sample, capsys):
    out = write_submission(tmp_path / "s.csv", [[("test_0", "clear primary"), ("test_1", "")], [("file_0", "haze")]])
    assert check_submission(out, sample) == []
    assert main(["check-submission", str(out), "--sample", str(sample)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, reason",
    [
        ("name,tags\ntest_0,clear\n", "header must be"),
        ("image_name,tags\ntest_0,clear\ntest_1,clear\n", "2 rows, the sample submission has 3"),
        ("image_name,tags\ntest_1,clear\ntest_0,clear\nfile_0,clear\n", "line 2 is test_1, expected test_0"),
        ("image_name,tags\ntest_0,clear\ntest_0,clear\nfile_0,clear\n", "duplicated image names"),
        ("image_name,tags\ntest_0,clear foggy\ntest_1,clear\nfile_0,clear\n", "unknown tags: foggy"),
        ("image_name,tags\ntest_0.jpg,clear\ntest_1,clear\nfile_0,clear\n", ".jpg extension"),
    ],
)
def test_bad_submissions_are_explained(tmp_path, sample, capsys, text, reason):
    p = tmp_path / "s.csv"
    p.write_text(text)
    assert any(reason in problem for problem in check_submission(p, sample))
    assert main(["check-submission", str(p), "--sample", str(sample)]) == 1
    assert reason in capsys.readouterr().err
