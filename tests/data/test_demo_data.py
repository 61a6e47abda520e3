import hashlib
from collections import Counter

from planet_batch.data.demo_data import load_tag_sets, tag_set_counts, write_demo_data
from planet_batch.data.labels import WEATHER_TAGS, read_labels


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_layout_is_complete_and_valid(demo_root):
    labels = read_labels(demo_root / "train_v2.csv", image_dir=demo_root / "train-jpg")
    assert len(labels) == 80
    assert len(list((demo_root / "test-jpg").glob("*.jpg"))) == 24
    assert len(list((demo_root / "test-jpg-additional").glob("*.jpg"))) == 16
    from PIL import Image

    with Image.open(demo_root / "train-jpg" / "train_0.jpg") as im:
        # 4-component like Planet's chips (which decode slower and which GPU decoders do not take by default)
        assert im.size == (256, 256) and im.format == "JPEG" and im.mode == "CMYK"


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a = write_demo_data(tmp_path / "a", n_train=6, n_test=3, n_additional=2, seed=5)
    b = write_demo_data(tmp_path / "b", n_train=6, n_test=3, n_additional=2, seed=5)
    c = write_demo_data(tmp_path / "c", n_train=6, n_test=3, n_additional=2, seed=6)
    assert digest(a) == digest(b) != digest(c)


def test_demo_tags_follow_planet_rules(tmp_path):
    root = write_demo_data(tmp_path / "d", n_train=2000, n_test=1, n_additional=1, seed=0)
    labels = read_labels(root / "train_v2.csv")
    counts = Counter(t for ts in labels.tags for t in ts)
    for ts in labels.tags:
        assert sum(t in WEATHER_TAGS for t in ts) == 1
        if "cloudy" in ts:
            assert ts == ("cloudy",)
    assert counts["primary"] / len(labels) > 0.85
    # Real frequency of clear is 70%, of conventional_mine 0.25%.
    assert 0.65 < counts["clear"] / len(labels) < 0.75
    assert counts["conventional_mine"] / len(labels) < 0.01


def test_shipped_tag_sets_are_the_real_joint_distribution(shared_data):
    assert tag_set_counts(read_labels(shared_data / "train_v2.csv")) == load_tag_sets()
