import io

import numpy as np
import pytest
import torch
from PIL import Image

from planet_batch.data.transforms import (
    DecodeError,
    Normalization,
    augment_batch,
    decode_batch,
    decode_image,
    dihedral,
    to_model_input,
)


def jpeg(mode="RGB", size=(256, 256), seed=0, **save_kw):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    # Smooth it so the JPEG is image-like rather than noise.
    im = Image.fromarray(arr.squeeze(), mode=None if mode != "CMYK" else "CMYK")
    im = im.resize((size[0] // 8, size[1] // 8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **save_kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L"])
def test_full_size_decode_equals_pillow_convert(mode):
    data = jpeg(mode)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_image(data, 256)
    assert out.dtype == np.uint8 and out.shape == (256, 256, 3)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
def test_reduced_size_decode_is_close_to_convert_then_resize(mode):
    data = jpeg(mode)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((128, 128), Image.BILINEAR)).astype(int)
    out = decode_image(data, 128).astype(int)
    assert out.shape == (128, 128, 3)
    assert np.abs(out - ref).mean() < 2.0


def test_non_square_is_resized():
    assert decode_image(jpeg(size=(300, 200)), 64).shape == (64, 64, 3)


def test_real_cmyk_chips_decode_like_pillow(shared_data):
    files = sorted((shared_data / "planet_sample" / "train-jpg").glob("*.jpg"))[:20]
    assert files
    for f in files:
        data = f.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "CMYK"  # the real chips are 4-component JPEGs
            ref = np.asarray(im.convert("RGB"))
        assert np.array_equal(decode_image(data, 256, f.stem), ref)
        small = decode_image(data, 128, f.stem).astype(int)
        ref_small = np.asarray(Image.fromarray(ref).resize((128, 128), Image.BILINEAR)).astype(int)
        assert np.abs(small - ref_small).mean() < 2.0


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "zero-length"), (jpeg()[:400], "Truncated"), (b"this is not an image", "cannot identify")],
)
def test_undecodable_bytes_raise_decode_error_with_name(data, reason):
    with pytest.raises(DecodeError) as e:
        decode_image(data, 64, "test_7")
    assert e.value.name == "test_7" and reason in str(e.value)


def test_decode_batch_marks_or_raises():
    batch = {"bytes": [jpeg(), b""], "path": ["/x/test-jpg/test_0.jpg", "s3://b/test-jpg/test_1.jpg"]}
    out = decode_batch(batch, 32, keep_bad=True)
    assert list(out["name"]) == ["test_0", "test_1"]
    assert list(out["ok"]) == [True, False] and "zero-length" in out["error"][1]
    assert out["image"].shape == (2, 32, 32, 3) and not out["image"][1].any()
    with pytest.raises(DecodeError, match="test_1"):
        decode_batch(batch, 32)


def test_dihedral_gives_the_8_symmetries_of_the_square_on_images_and_batches():
    from reference import square_views

    batch = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 3), dtype=np.uint8)  # odd size: no lucky centre
    pillow = sorted(v.tobytes() for v in square_views(batch))
    assert sorted(np.ascontiguousarray(dihedral(batch, k)).tobytes() for k in range(8)) == pillow
    for k in range(8):  # a batch is its images, each turned the same way
        np.testing.assert_array_equal(dihedral(batch, k), np.stack([dihedral(im, k) for im in batch]))
    for k in range(8):  # a tensor on its device (scoring's TTA) turns the same way as the array
        np.testing.assert_array_equal(dihedral(torch.from_numpy(batch), k).numpy(), dihedral(batch, k))


def test_augment_keeps_shape_and_changes_pixels():
    images = np.stack([decode_image(jpeg(seed=s), 64) for s in range(8)])
    out = augment_batch(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    # Lighting is mild: the mean brightness moves by little.
    assert abs(out.astype(float).mean() - images.astype(float).mean()) < 20


def test_to_model_input_normalises_into_channels_last():
    images = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    norm = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = to_model_input(images, "cpu", norm)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(norm.mean)) / torch.tensor(norm.std)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)
