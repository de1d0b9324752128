"""Reads MNIST-format IDX files (raw or gzip), checking them as it goes.

Format: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one big-endian uint32 per dimension, then the data in row-major
order. Every defect raises ``IdxError`` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from cnnflat_jax import paths
from cnnflat_jax.data import catalog, dataset
from cnnflat_jax.data.examples import check_labels
from cnnflat_jax.errors import Error

_UBYTE = 0x08


class IdxError(Error, ValueError):
    """A missing, truncated or corrupt IDX file."""


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file with ``ndim`` dimensions.

    Args:
      path: ``*.gz`` (gzip) or a raw IDX file; local or a URI (``gs://``).
      ndim: 1 for label files, 3 for image files.

    Returns:
      A uint8 array with the shape stored in the header.

    Raises:
      IdxError: the file is missing, not gzip although named ``.gz``, truncated,
        has the wrong magic number or dimension count, or holds extra bytes.
    """
    path = os.fspath(path)
    try:
        with paths.open_binary(path) as raw:
            data = gzip.decompress(raw.read()) if path.endswith(".gz") else raw.read()
    except FileNotFoundError:
        raise IdxError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise IdxError(f"{path}: not a readable gzip file ({e}); is it truncated?") from None
    if len(data) < 4:
        raise IdxError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _UBYTE:
        raise IdxError(
            f"{path}: bad magic number 0x{data[:4].hex()}; "
            f"expected 0x0000080{ndim} (unsigned-byte IDX with {ndim} dimensions)"
        )
    if dims != ndim:
        raise IdxError(f"{path}: has {dims} dimensions, expected {ndim}")
    header_size = 4 + 4 * dims
    if len(data) < header_size:
        raise IdxError(f"{path}: truncated inside the header")
    shape = struct.unpack(f">{dims}I", data[4:header_size])
    expected = int(np.prod(shape)) + header_size
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: {problem}: header says shape {shape} ({expected} bytes), "
            f"file holds {len(data)} bytes"
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (raw, or gzip when ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = struct.pack(f">HBB{array.ndim}I", 0, _UBYTE, array.ndim, *array.shape)
    with (gzip.open if os.fspath(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = paths.join(directory, candidate)
        if paths.exists(path):
            return path
    raise IdxError(f"{directory}: no {stem} or {stem}.gz")


def load(name: str, directory: str, part: dataset.Part, num_classes: int) -> dataset.Dataset:
    """``part`` of the IDX files in ``directory``; the class count is ``num_classes``,
    else the catalog's (IDX files carry none)."""
    entry = catalog.CATALOG.get(name)
    num_classes = num_classes or (entry.num_classes if entry else 0)
    if not num_classes:
        raise dataset.DatasetError(
            f"IDX files carry no class count and {name!r} is not one of "
            f"{sorted(catalog.CATALOG)}: set --config.num_classes"
        )
    arrays, totals, where = {}, {}, {}
    for split, (images_stem, labels_stem) in FILES.items():
        images_path = _find_file(directory, images_stem)
        labels_path = _find_file(directory, labels_stem)
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise IdxError(
                f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        check_labels(labels, num_classes, labels_path, IdxError)
        totals[split], start, stop = part.bounds(split, len(labels))
        arrays[split] = (images[start:stop, ..., None].copy(), labels[start:stop].astype(np.int32))
        where[split] = images_path
    return dataset.from_arrays(
        name, f"IDX files in {directory}", num_classes, arrays, totals, where
    )
