"""Reference models and results the tests compare the Ray pipelines against."""

import numpy as np
import torch
from PIL import Image

from planet_batch.data.labels import TAGS
from planet_batch.data.transforms import decode_image, to_model_input
from planet_batch.export import ExportMeta, load_export, save_export
from planet_batch.model import build_model, normalization


def tiny_export(path, size=32):
    torch.manual_seed(0)
    return save_export(path, build_model("resnet18", len(TAGS)).state_dict(), ExportMeta(
        arch="resnet18", tags=TAGS, size=size, normalize=normalization("resnet18"), threshold=0.2,
        thresholds=np.full(len(TAGS), 0.2)))


# The 8 symmetries of the square as Pillow implements them, independent of the package's `dihedral`
SQUARE_SYMMETRIES = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
                     Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
                     Image.Transpose.TRANSVERSE)


def square_views(images: np.ndarray) -> list[np.ndarray]:
    """Each of the 8 symmetries applied to every image of an (N, H, W, 3) batch, by Pillow."""
    return [np.stack([np.asarray(Image.fromarray(im) if t is None else Image.fromarray(im).transpose(t))
                      for im in images]) for t in SQUARE_SYMMETRIES]


def plain_probs(export_dir, paths, size, tta=False):
    """The same model run by hand on the same decoder: what the Ray pipeline must reproduce."""
    exported = load_export(export_dir)
    model = exported.build()
    images = np.stack([decode_image(p.read_bytes(), size) for p in paths])
    views = square_views(images) if tta else [images]
    with torch.inference_mode():
        return np.mean([torch.sigmoid(model(to_model_input(np.ascontiguousarray(v), "cpu", exported.normalize)))
                        .numpy() for v in views], 0)
