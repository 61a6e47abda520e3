import random
import subprocess
import sys

import numpy as np
import pytest

from planet_batch.data.layout import LayoutError, find_layout, read_sample_submission, split_indices, submission_order
from planet_batch.data.layout import test_images as ordered_test_images


def touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_competition_layout(demo_root):
    lay = find_layout(demo_root, need=("train", "test"))
    assert lay.kind == "competition"
    assert str(lay.train_csv) == str(demo_root / "train_v2.csv")
    assert [str(d) for d in lay.test_dirs] == [str(demo_root / "test-jpg"), str(demo_root / "test-jpg-additional")]
    assert str(lay.sample_submission) == str(demo_root / "sample_submission_v2.csv")


def test_kaggle_dataset_layout(tmp_path):
    touch(tmp_path / "planet/planet/train_classes.csv", b"image_name,tags\n")
    (tmp_path / "planet/planet/train-jpg").mkdir()
    touch(tmp_path / "planet/planet/test-jpg/test_0.jpg")
    touch(tmp_path / "test-jpg-additional/test-jpg-additional/file_0.jpg")
    touch(tmp_path / "planet/planet/sample_submission.csv")
    lay = find_layout(tmp_path, need=("train", "test"))
    assert lay.kind == "kaggle-dataset"
    assert lay.train_csv.name == "train_classes.csv"
    assert [d.name for d in lay.test_dirs] == ["test-jpg", "test-jpg-additional"]


def test_missing_parts_list_where_they_were_looked_for(tmp_path):
    (tmp_path / "train-jpg").mkdir()
    with pytest.raises(LayoutError) as e:
        find_layout(tmp_path, need=("train",))
    msg = str(e.value)
    assert str(tmp_path / "train_v2.csv") in msg and str(tmp_path / "planet/planet/train_classes.csv") in msg
    with pytest.raises(LayoutError, match="test-jpg"):
        find_layout(tmp_path, need=("test",))


def test_submission_order_matches_real_sample_submission(shared_data):
    expected = read_sample_submission(shared_data / "sample_submission_v2.csv")
    assert len(expected) == 61191
    shuffled = expected[:]
    random.Random(0).shuffle(shuffled)
    assert submission_order(shuffled) == expected


def test_submission_order_rule():
    assert submission_order(["file_10", "test_10", "file_1", "test_2", "file_0", "test_0"]) == [
        "test_0", "test_2", "test_10", "file_0", "file_1", "file_10"
    ]


def test_test_images_follow_sample_submission(demo_root):
    order, paths = ordered_test_images(find_layout(demo_root))
    assert order == read_sample_submission(demo_root / "sample_submission_v2.csv")
    assert set(order) == set(paths) and len(order) == 40
    assert order == submission_order(paths)


def test_split_is_seeded_exact_and_order_independent():
    names = [f"train_{i}" for i in range(1000)]
    tr, va = split_indices(names, 0.2, 42)
    assert len(va) == 200 and len(tr) == 800 and not set(tr) & set(va)
    tr2, va2 = split_indices(names, 0.2, 42)
    assert np.array_equal(va, va2)
    rev = names[::-1]
    _, va_rev = split_indices(rev, 0.2, 42)
    assert {rev[i] for i in va_rev} == {names[i] for i in va}
    _, va_other = split_indices(names, 0.2, 7)
    assert not np.array_equal(va, va_other)


def test_split_is_identical_in_another_process():
    code = (
        "from planet_batch.data.layout import split_indices;"
        "print(list(split_indices([f'train_{i}' for i in range(50)], 0.2, 42)[1]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(list(split_indices([f"train_{i}" for i in range(50)], 0.2, 42)[1]))
