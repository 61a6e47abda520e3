import numpy as np
import pytest

from planet_batch.data.labels import TAGS, LabelFileError, decode, encode, read_labels


def write(tmp_path, text, name="train_v2.csv", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_canonical_order_is_fastais_sorted_17_tags():
    assert len(TAGS) == 17 and list(TAGS) == sorted(TAGS)


def test_parse_and_multi_hot(tmp_path):
    p = write(tmp_path, "image_name,tags\ntrain_0,haze primary\ntrain_1,agriculture clear primary water\n")
    labels = read_labels(p)
    assert labels.names == ("train_0", "train_1")
    m = labels.multi_hot()
    assert m.shape == (2, 17) and m.dtype == np.float32
    assert [TAGS[i] for i in np.flatnonzero(m[1])] == ["agriculture", "clear", "primary", "water"]


def test_bom_blank_lines_whitespace_and_quotes(tmp_path):
    p = write(tmp_path, '\ufeffimage_name,tags\n\n train_0 , "clear  primary" \n\n', encoding="utf-8")
    labels = read_labels(p)
    assert labels.names == ("train_0",) and labels.tags == (("clear", "primary"),)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("name,tags\ntrain_0,clear\n", 1, "missing column"),
        ("image_name,tags\ntrain_0,clear\ntrain_1,clear foggy\n", 3, "unknown tag(s) ['foggy']"),
        ("image_name,tags\ntrain_0,clear\ntrain_0,haze\n", 3, "duplicate image name 'train_0' (first on line 2)"),
        ("image_name,tags\ntrain_0,\n", 2, "empty tag set"),
        ("image_name,tags\ntrain_0,clear,extra\n", 2, "expected 2 fields"),
    ],
)
def test_bad_files_name_file_line_and_problem(tmp_path, text, line, fragment):
    p = write(tmp_path, text)
    with pytest.raises(LabelFileError) as e:
        read_labels(p)
    assert e.value.line == line and fragment in str(e.value) and str(p) in str(e.value)


def test_not_utf8_is_a_label_error(tmp_path):
    p = tmp_path / "train_v2.csv"
    p.write_bytes(b"image_name,tags\ntrain_\xff,clear\n")
    with pytest.raises(LabelFileError, match="not UTF-8"):
        read_labels(p)


def test_missing_images_reports_count_and_first_names(tmp_path):
    (tmp_path / "train-jpg").mkdir()
    (tmp_path / "train-jpg" / "train_0.jpg").write_bytes(b"x")
    rows = "".join(f"train_{i},clear primary\n" for i in range(10))
    p = write(tmp_path, "image_name,tags\n" + rows)
    with pytest.raises(LabelFileError, match=r"9 of 10 listed images are missing .* first: train_1.jpg, train_2.jpg"):
        read_labels(p, image_dir=tmp_path / "train-jpg")


def test_decode_scalar_and_per_class_thresholds():
    probs = np.zeros((2, 17))
    probs[0, TAGS.index("clear")] = 0.3
    probs[0, TAGS.index("primary")] = 0.9
    probs[1, TAGS.index("water")] = 0.15
    assert decode(probs, 0.2) == ["clear primary", ""]
    per_class = np.full(17, 0.5)
    per_class[TAGS.index("water")] = 0.1
    assert decode(probs, per_class) == ["primary", "water"]


def test_encode_decode_round_trip():
    tags = [("clear", "primary"), ("cloudy",), ("agriculture", "haze", "primary", "road")]
    assert decode(encode(tags), 0.5) == [" ".join(t) for t in tags]


def test_real_labels_file(shared_data):
    labels = read_labels(shared_data / "train_v2.csv")
    assert len(labels) == 40479
    assert set(t for ts in labels.tags for t in ts) == set(TAGS)
