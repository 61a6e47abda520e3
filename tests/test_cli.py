from PIL import Image

from planet_batch.cli import main
from planet_batch.labels import read_labels


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
