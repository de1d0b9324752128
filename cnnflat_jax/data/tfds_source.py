"""TFDS: the only module that knows it. Whole splits loaded into memory, or
TFDS's ArrayRecord data source for the grain pipeline.

Nothing imports this module at start: the input pipeline does when a run
reads TFDS data. TensorFlow is imported only here, and kept off accelerators.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
import shutil
from collections.abc import Iterator

import numpy as np

from cnnflat_jax.data import dataset, idx
from cnnflat_jax.data.array_records import RecordError, Records
from cnnflat_jax.data.examples import check_labels


class NotAvailable(Exception):
    """TFDS could not provide the dataset (not prepared, or download failed)."""


def _import_tensorflow_cpu_only():
    import tensorflow as tf

    try:
        # TF must not take accelerator memory that JAX needs.
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # Devices already initialised (hidden earlier) or no TPU type.
    return tf


def load(
    name: str, data_dir: str | None, part: dataset.Part, num_classes: int, *, download: bool
) -> dataset.Dataset:
    if not download and not is_prepared(name, data_dir):
        raise NotAvailable(f"not prepared in {data_dir_of(data_dir)}")
    _import_tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    root = data_dir_of(data_dir)
    try:
        with _removed_on_failure([root, os.path.join(root, name), os.path.join(root, "downloads")]):
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                builder.download_and_prepare()
    except tfds.core.registered.DatasetNotFoundError:
        # TFDS's own message lists all ~1,500 datasets of the catalog: name the closest.
        close = difflib.get_close_matches(
            name, tfds.list_builders(with_community_datasets=False), n=3
        )
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise dataset.DatasetError(
            f"config.dataset={name}: not in the TFDS catalog{hint}; allowed: a TFDS catalog "
            "name or folder:PATH"
        ) from None
    except Exception as e:  # Network, disk, checksum: report and go on to the next source.
        raise NotAvailable(f"download failed: {type(e).__name__}: {e}") from e
    info = builder.info
    classes = info.features["label"].num_classes
    if num_classes not in (0, classes):
        raise dataset.DatasetError(
            f"config.num_classes={num_classes}, but TFDS {name} has {classes} classes; "
            "leave it 0 to take TFDS's count"
        )
    splits, totals, selections = {}, {}, {}
    for split in ("train", "test"):
        selection = split
        if part != dataset.Part():  # Read only this part: TFDS slices by example index.
            totals[split], start, stop = part.bounds(split, info.splits[split].num_examples)
            selection = f"{split}[{start}:{stop}]"
        ds = builder.as_dataset(split=selection, shuffle_files=False).batch(10_000)
        batches = list(tfds.as_numpy(ds))
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
        selections[split] = f"TFDS {name} {selection}"
        check_labels(labels, classes, selections[split], idx.IdxError)
        splits[split] = (images, labels)
        totals.setdefault(split, len(labels))
    source = f"TFDS {name} {info.version} in {builder.data_dir}"
    return dataset.from_arrays(name, source, classes, splits, totals, selections)


def data_dir_of(data_dir: str | None) -> str:
    """TFDS's data directory: ``data_dir``, else $TFDS_DATA_DIR, else its default."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )


def is_prepared(name: str, data_dir: str | None) -> bool:
    """Whether ``name`` is prepared, found without ``tfds.builder``, which
    creates empty directories in the data directory as a side effect."""
    pattern = os.path.join(data_dir_of(data_dir), name, "**", "dataset_info.json")
    return bool(glob.glob(pattern, recursive=True))


@contextlib.contextmanager
def _removed_on_failure(directories: list[str]) -> Iterator[None]:
    """On an exception, removes what the block added to ``directories``.

    A directory that did not exist before is removed whole; in one that did,
    only the new entries go. List parents before their children.
    """
    before = {d: set(os.listdir(d)) if os.path.isdir(d) else None for d in directories}
    try:
        yield
    except BaseException:
        for directory, entries in before.items():
            if not os.path.isdir(directory):
                continue
            new = [directory] if entries is None else [
                os.path.join(directory, e) for e in set(os.listdir(directory)) - entries
            ]  # fmt: skip
            for path in new:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        raise


def records(name: str, data_dir: str | None):
    """``(open_split, counts, num_classes, source)`` of TFDS's ArrayRecord data source."""
    make_files = (
        "write ArrayRecord files from IDX files and pass their directory: "
        f"python -m cnnflat_jax.array_records --dataset {name} --out_dir DIR, then "
        "--config.array_record_dir=DIR; or prepare it with TFDS: "
        f"tfds build {name} --file_format=array_record"
    )
    if not is_prepared(name, data_dir):
        raise dataset.DatasetError(
            f"the grain pipeline needs {name!r} in a random-access format, and TFDS has no "
            f"prepared copy in {data_dir_of(data_dir)}: {make_files}"
        )
    _import_tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise dataset.DatasetError(
            f"TFDS {name} in {builder.data_dir} is prepared as {file_format.value}, which has "
            f"no random access: {make_files}"
        )
    classes = builder.info.features["label"].num_classes

    def open_split(split, ids):
        source = builder.as_data_source(split=split)
        where = f"TFDS {name} {split}"

        def decode(examples, record_ids):
            labels = np.array([e["label"] for e in examples], np.int32)
            check_labels(labels, classes, where, RecordError, record_ids, "record")
            return np.stack([e["image"] for e in examples]), labels

        shape = tuple(builder.info.features["image"].shape)
        return Records(source, decode, ids, shape, where)

    counts = {split: builder.info.splits[split].num_examples for split in ("train", "test")}
    return open_split, counts, classes, f"TFDS {name} {builder.info.version} (ArrayRecord)"
