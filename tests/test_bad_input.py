"""A corpus of awkward and broken images: each is decoded like Pillow's convert("RGB") or reported."""

import errno
import io

import numpy as np
import pytest
from PIL import Image

from planet_batch.data.submission import write_submission
from planet_batch.data.transforms import DecodeError, decode_image

SIZE = 64


def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth(mode, size=(SIZE, SIZE), seed=0):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (size[1] // 8, size[0] // 8, channels), dtype=np.uint8).squeeze()
    return Image.fromarray(arr, mode=mode if mode == "CMYK" else None).resize(size, Image.BILINEAR)


def cmyk_without_adobe_marker():
    """Pillow always writes an Adobe APP14 segment for CMYK; cut it out to get the bare 4-component JPEG."""
    data = encoded(smooth("CMYK"), "JPEG", quality=95)
    i = data.find(b"\xff\xee")
    assert i > 0
    length = int.from_bytes(data[i + 2:i + 4], "big")
    return data[:i] + data[i + 2 + length:]


DECODABLE = {
    "grayscale": lambda: encoded(smooth("L"), "JPEG"),
    "cmyk_adobe": lambda: encoded(smooth("CMYK"), "JPEG"),
    "cmyk_no_adobe": cmyk_without_adobe_marker,
    "png_named_jpg": lambda: encoded(smooth("RGB"), "PNG"),
    "png_16bit": lambda: encoded(Image.fromarray(
        np.random.default_rng(1).integers(0, 65535, (SIZE, SIZE), dtype=np.uint16)), "PNG"),
    "rgba_png": lambda: encoded(Image.new("RGBA", (SIZE, SIZE), (10, 200, 30, 40)), "PNG"),
}
BROKEN = {
    "truncated": lambda: encoded(smooth("RGB"), "JPEG")[:300],
    "zero_bytes": lambda: b"",
    "text": lambda: b"image_name,tags\n",
    "bomb": lambda: encoded(Image.new("L", (20000, 12000)), "JPEG", quality=10),
}


@pytest.mark.parametrize("kind", sorted(DECODABLE))
def test_awkward_images_decode_like_pillow(kind):
    data = DECODABLE[kind]()
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(im.convert("RGB"))
    assert np.array_equal(decode_image(data, SIZE, kind), reference)


def test_non_square_is_squished_to_size():
    data = encoded(smooth("RGB", size=(160, 64)), "JPEG")
    assert decode_image(data, SIZE).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_images_raise_decode_error_with_the_name(kind):
    with pytest.raises(DecodeError) as e:
        decode_image(BROKEN[kind](), SIZE, f"test_{kind}")
    assert e.value.name == f"test_{kind}"


def test_a_failed_write_leaves_the_previous_submission_untouched(tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    write_submission(out, [[("test_0", "clear")]])
    before = out.read_bytes()

    import csv

    class DiskFull:
        def __init__(self, *a, **k):
            pass

        def writerow(self, row):
            raise OSError(errno.ENOSPC, "No space left on device")

        writerows = writerow

    monkeypatch.setattr(csv, "writer", DiskFull)
    with pytest.raises(OSError, match="No space left"):
        write_submission(out, [[("test_0", "haze")]])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left behind
