"""Classifies image files with a run's exported model: one line per image.

    python -m cnnflat_jax.export --workdir runs/default
    python -m cnnflat_jax.predict --workdir runs/default shoe.png shirts.npy t10k-images-idx3-ubyte

Reads ``W/export/model.jax`` (``jax.export``) and ``W/export/classes.json``;
neither the config nor the model code is used. Files:

- PNG or JPEG: one image; converted to grayscale or RGB to match the model.
- ``.npy``: one image ``(H, W)`` / ``(H, W, C)``, or a stack ``(N, H, W[, C])``,
  uint8 pixels.
- IDX (``*-ubyte``, optionally ``.gz``): a stack of images, as MNIST ships them.

Each image must have the model's height and width, except a picture when the
run trained on a folder of pictures (``folder:PATH``): those were resized to
the model's size, and so is each picture here, the same way (``pictures``).
Prints ``FILE<TAB>CLASS NAME<TAB>PROBABILITY`` per image (``FILE[i]`` for an
image of a stack). A file that cannot be read is one ``error:`` line naming
it, and nothing is classified.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys

import numpy as np

from cnnflat_jax import paths
from cnnflat_jax.data import idx, pictures
from cnnflat_jax.data.pictures import UnreadableImageError
from cnnflat_jax.errors import Error
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import command

__all__ = [
    "DamagedExportError",
    "read_export",
    "UnreadableImageError",
    "read_images",
    "main",
]

# The most that one file may hold: 2^28 uint8 values (256 MiB of pixels); larger
# ones (and pictures of more than ``pictures.MAX_PICTURE_PIXELS``) are refused
# before they are decoded.
MAX_VALUES = 2**28


class DamagedExportError(Error, ValueError):
    """``W/export``'s files are incomplete, edited or damaged: export again."""


def read_export(workdir: str) -> tuple[dict, bytes]:
    """``classes.json`` and the bytes of ``model.jax``, checked against the
    SHA-256 that ``export`` wrote beside them, before anything is loaded.

    Raises:
      OSError: a file is missing.
      DamagedExportError: ``classes.json`` lacks a field, or ``model.jax`` does
        not match its checksum.
    """
    classes_path = workdir_lib.path(workdir, workdir_lib.EXPORT_CLASSES)
    model_path = workdir_lib.path(workdir, workdir_lib.EXPORT_MODEL)
    try:
        classes = json.loads(paths.read_bytes(classes_path))
    except ValueError as e:
        raise DamagedExportError(f"{classes_path} is not JSON ({e}); export again") from None
    serialized = paths.read_bytes(model_path)
    shape = classes.get("image_shape") if isinstance(classes, dict) else None
    if (
        not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(n, int) for n in shape)
        or not isinstance(classes.get("class_names"), list)
        or not isinstance(classes.get("model_sha256"), str)
    ):  # fmt: skip
        raise DamagedExportError(
            f"{classes_path} lacks image_shape, class_names or model_sha256; export again"
        )
    if hashlib.sha256(serialized).hexdigest() != classes["model_sha256"]:
        raise DamagedExportError(
            f"{model_path} does not match the SHA-256 in {classes_path}: damaged or replaced "
            f"({len(serialized)} bytes); export again"
        )
    return classes, serialized


def _deserialize(serialized: bytes, workdir: str):
    import jax  # After every file is read and checked: a bad file costs no start-up.

    try:
        return jax.export.deserialize(bytearray(serialized))
    except Exception as e:  # Flatbuffers and JAX raise many kinds; the checksum passed.
        path = workdir_lib.path(workdir, workdir_lib.EXPORT_MODEL)
        raise DamagedExportError(
            f"{path} cannot be loaded ({type(e).__name__}); export again"
        ) from None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def read_images(
    path: str, image_shape: tuple[int, int, int], resize: bool = False
) -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 HWC image)`` for each image in ``path``; a picture (PNG,
    JPEG) is resized to ``image_shape`` when ``resize`` (a folder dataset's
    run resized its training pictures the same way), never an array.

    Raises:
      UnreadableImageError: not a regular file; unreadable, truncated or too
        large; pixels that are not 8-bit (16-bit pictures are scaled); no
        image; an image of another shape.
    """
    height, width, channels = image_shape
    resize = (height, width) if resize else None
    try:
        local = _local_file(path)
        if path.endswith(".npy"):
            array = _read_npy(local, path)
        elif path.endswith(("-ubyte", "-ubyte.gz")):
            array = idx.read_idx(path, ndim=3)
        else:
            array = pictures.read_picture(local, channels, resize, name=path)[None]  # One image.
    except UnreadableImageError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:
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
    if not len(array):
        raise UnreadableImageError(f"{path}: a stack of no images")
    if len(array) == 1:
        return [(path, array[0])]
    return [(f"{path}[{i}]", image) for i, image in enumerate(array)]


def _local_file(path: str) -> str:
    """``path``, a regular file, on the local disk (a URI's object is downloaded first).

    Raises:
      UnreadableImageError: not a regular file, or an object too large to read.
    """
    if paths.is_remote(path):
        size = paths.size(path)
        if size > MAX_VALUES + 2**20:  # Any file of at most MAX_VALUES values, with room.
            raise UnreadableImageError(
                f"{path}: {size:,} bytes, more than predict reads from one file; split it"
            )
        return paths.local_copy(path)
    if not stat.S_ISREG(os.stat(path).st_mode):  # A FIFO would block, a device never end.
        raise UnreadableImageError(f"{path}: not a regular file")
    return path


def _read_npy(local: str, path: str) -> np.ndarray:
    """The array in ``local`` (``path``'s content), its size checked against
    ``MAX_VALUES`` before it is read."""
    mapped = np.load(local, mmap_mode="r", allow_pickle=False)
    if mapped.size > MAX_VALUES:
        raise UnreadableImageError(
            f"{path}: holds {mapped.size:,} values, more than the {MAX_VALUES:,} predict reads "
            "from one file; split it"
        )
    return np.array(mapped)


USAGE = "python -m cnnflat_jax.predict --workdir W FILES..."


def main(argv: list[str]) -> int:
    """The command line: ``argv`` is the program's name, ``--workdir W`` and the
    files. Returns 0; a wrong command line ends it with code 2, a file that
    cannot be read (``error:``) with 1."""
    workdir, files = _arguments(argv)
    with command.one_line_failures():
        try:
            classes, serialized = read_export(workdir)
            shape, resize = tuple(classes["image_shape"]), bool(classes.get("resize_pictures"))
            images = [x for path in files for x in read_images(path, shape, resize)]
            exported = _deserialize(serialized, workdir)
        except OSError as e:
            command.fail(f"{e}; run python -m cnnflat_jax.export --workdir {workdir}")
    logits = exported.call(np.stack([image for _, image in images]))
    probabilities = np.asarray(_softmax(np.asarray(logits, np.float64)))
    for (name, _), p in zip(images, probabilities):
        best = int(np.argmax(p))
        print(f"{name}\t{classes['class_names'][best]}\t{p[best]:.4f}")
    return 0


def _arguments(argv: list[str]) -> tuple[str, list[str]]:
    """``--workdir W`` (or ``--workdir=W``) and the files, parsed by absl."""
    from absl import flags

    parsed = flags.FlagValues()
    flags.DEFINE_string(
        "workdir", None, "A run exported by cnnflat_jax.export.", flag_values=parsed
    )
    try:
        files = parsed(argv)[1:]
    except flags.Error:
        command.usage(USAGE, code=2)
    if not parsed.workdir or not files:
        command.usage(USAGE, code=2)
    return parsed.workdir, files


def console() -> None:
    """The ``cnnflat-predict`` command."""
    sys.exit(main(sys.argv))
