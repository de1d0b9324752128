"""Classifies image files with a run's exported model: one line per image.

    python -m cnnflat_jax.export --workdir runs/default
    python -m cnnflat_jax.predict --workdir runs/default shoe.png shirts.npy t10k-images-idx3-ubyte

Reads ``W/export/model.jax`` (``jax.export``) and ``W/export/classes.json``;
neither the config nor the model code is used. Files:

- PNG or JPEG: one image; converted to grayscale or RGB to match the model.
- ``.npy``: one image ``(H, W)`` / ``(H, W, C)``, or a stack ``(N, H, W[, C])``,
  uint8 pixels.
- IDX (``*-ubyte``, optionally ``.gz``): a stack of images, as MNIST ships them.

Each image must have the model's height and width (no resizing happens).
Prints ``FILE<TAB>CLASS NAME<TAB>PROBABILITY`` per image (``FILE[i]`` for an
image of a stack). A file that cannot be read is one ``error:`` line naming
it, and nothing is classified.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from cnnflat_jax.data import idx
from cnnflat_jax.errors import Error
from cnnflat_jax.run import workdir as workdir_lib

__all__ = [
    "UnreadableImageError",
    "read_images",
    "main",
]

_PIL_MODES = {1: "L", 3: "RGB"}


class UnreadableImageError(Error, ValueError):
    """A file that is not an image of the model's size."""


def read_images(path: str, image_shape: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 HWC image)`` for each image in ``path``."""
    height, width, channels = image_shape
    try:
        if path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        elif path.endswith(("-ubyte", "-ubyte.gz")):
            array = idx.read_idx(path, ndim=3)
        else:
            array = _read_picture(path, channels)
    except (OSError, ValueError) as e:
        raise UnreadableImageError(f"{path}: cannot read it as an image: {e}") from None
    if array.dtype != np.uint8:
        raise UnreadableImageError(f"{path}: pixels are {array.dtype}, not uint8 (0-255)")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == channels != array.shape[0]):
        array = array[None]  # One image.
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[1:] != (height, width, channels):
        raise UnreadableImageError(
            f"{path}: images of shape {array.shape[1:] if array.ndim == 4 else array.shape}, "
            f"but the model takes {height}x{width}x{channels}"
        )
    if len(array) == 1:
        return [(path, array[0])]
    return [(f"{path}[{i}]", image) for i, image in enumerate(array)]


def _read_picture(path: str, channels: int) -> np.ndarray:
    from PIL import Image  # Pillow: matplotlib's own dependency.

    with Image.open(path) as image:
        return np.asarray(image.convert(_PIL_MODES.get(channels, "RGB")))


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args and args[0].startswith("--workdir="):
        args = ["--workdir", args[0].removeprefix("--workdir="), *args[1:]]
    if len(args) < 3 or args[0] != "--workdir":
        print("usage: python -m cnnflat_jax.predict --workdir W FILES...", file=sys.stderr)
        return 2
    workdir, files = args[1], args[2:]
    try:
        with open(workdir_lib.path(workdir, workdir_lib.EXPORT_CLASSES)) as f:
            classes = json.load(f)
        with open(workdir_lib.path(workdir, workdir_lib.EXPORT_MODEL), "rb") as f:
            serialized = bytearray(f.read())
    except OSError as e:
        print(f"error: {e}; run python -m cnnflat_jax.export --workdir {workdir}", file=sys.stderr)
        return 1
    try:
        images = [x for path in files for x in read_images(path, tuple(classes["image_shape"]))]
    except UnreadableImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax  # After the files are read: a bad file costs no start-up.

    exported = jax.export.deserialize(serialized)
    logits = exported.call(np.stack([image for _, image in images]))
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    for (name, _), p in zip(images, probabilities):
        best = int(np.argmax(p))
        print(f"{name}\t{classes['class_names'][best]}\t{p[best]:.4f}")
    return 0
