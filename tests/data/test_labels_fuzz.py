"""Property-based label files: every generated file is parsed correctly or rejected with a line-specific error."""

import csv
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planet_batch.data.labels import TAG_INDEX, TAGS, LabelFileError, read_labels

names = st.from_regex(r"train_[0-9]{1,5}", fullmatch=True)
tag_sets = st.lists(st.sampled_from(TAGS), min_size=1, max_size=5, unique=True)
junk_tags = st.lists(st.sampled_from([*TAGS, "foggy", "Clear", "primary,", ""]), min_size=0, max_size=4)


def csv_text(draw, rows, extra_lines) -> str:
    """`rows` as a label file: either quoting, padded fields, and one of `extra_lines` after some rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])), lineterminator="\n")
    writer.writerow(["image_name", "tags"])
    for name, tags in rows:
        pad = draw(st.sampled_from(["", " ", "  "]))
        writer.writerow([pad + name + pad, pad + " ".join(tags) + pad])
        if draw(st.booleans()):
            buf.write(draw(st.sampled_from(extra_lines)))
    return buf.getvalue()


@st.composite
def label_files(draw):
    rows = draw(st.lists(st.tuples(names, st.one_of(tag_sets, junk_tags)), min_size=0, max_size=12))
    text = csv_text(draw, rows, ["\n", "  \n", ",\n"])  # blank or empty-field lines
    expected = [(name, tuple(t for t in tags if t)) for name, tags in rows]
    return (draw(st.sampled_from(["", "\ufeff"])) + text, draw(st.sampled_from(["utf-8", "latin-1", "utf-16"])),
            expected)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label_files())
def test_generated_label_files_parse_or_fail_with_a_line(tmp_path, generated):
    text, encoding, expected = generated
    path = tmp_path / "train_v2.csv"
    try:
        path.write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        return
    try:
        labels = read_labels(path)
    except LabelFileError as e:
        assert str(path) in str(e)
        # Content problems name their line; whole-file problems (encoding, no rows) say so without one.
        assert e.line is not None or any(k in e.problem for k in ("UTF-8", "no rows", "empty file", "missing col"))
        return
    # Accepted means parsed exactly: every row, in order, names and tags without the padding.
    assert list(zip(labels.names, labels.tags)) == expected
    assert all(tags and all(t in TAG_INDEX for t in tags) for _, tags in expected)


@st.composite
def valid_label_files(draw):
    """Files that must be accepted: known tags, unique names, UTF-8 (with or without BOM), padding, either quoting,
    blank lines."""
    rows = draw(st.lists(st.tuples(names, tag_sets), min_size=1, max_size=12, unique_by=lambda r: r[0]))
    text = csv_text(draw, rows, ["\n", "  \n"])
    return draw(st.sampled_from(["", "\ufeff"])) + text, [(n, tuple(t)) for n, t in rows]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_label_files())
def test_generated_valid_label_files_are_accepted_exactly(tmp_path, generated):
    """The other half: a parser that refused every file would pass the test above, not this one."""
    text, expected = generated
    path = tmp_path / "train_v2.csv"
    path.write_bytes(text.encode("utf-8"))
    labels = read_labels(path)
    assert list(zip(labels.names, labels.tags)) == expected
