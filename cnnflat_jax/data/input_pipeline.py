"""Datasets -> uint8 arrays and record sources, whatever a config names.

The memory pipeline loads whole splits into host memory, from a TFDS catalog
dataset (prepared in ``data_dir``, or downloaded when online:
``tfds_source``), a local directory of MNIST-format IDX files (``idx``), such
as Debian's ``dataset-fashion-mnist`` package, or a folder of pictures
(``folders``). The grain pipeline leaves the training split in a
random-access source, read batch by batch as Grain streams it: ArrayRecord
files written by ``array_records``, or TFDS's ArrayRecord data source. What
is known of each named dataset is ``catalog``'s.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import paths
from cnnflat_jax.data import array_records, folders, idx, shards, transforms
from cnnflat_jax.data.catalog import DEBIAN_IDX_DIRS, class_names
from cnnflat_jax.data.dataset import Dataset, DatasetError, Part, from_arrays
from cnnflat_jax.data.examples import Arrays, Examples

# Re-exported: the names callers have always found here.
__all__ = [
    "DEBIAN_IDX_DIRS", "PIPELINES", "SOURCES", "Dataset", "DatasetError", "Examples", "Part",
    "class_names", "load_data", "load_dataset", "load_records",
]  # fmt: skip

SOURCES = ("auto", "tfds", "idx")
PIPELINES = ("memory", "grain")


def load_dataset(
    name: str,
    *,
    source: str = "auto",
    data_dir: str | None = None,
    idx_dir: str | None = None,
    part: Part = Part(),
    num_classes: int = 0,
    image_size: tuple[int, int] = (28, 28),
    image_channels: int = 1,
    held_out: int = 0,
) -> Dataset:
    """Loads ``part`` of the train and test splits of ``name``.

    Args:
      name: a TFDS catalog name, e.g. "fashion_mnist", "mnist", "kmnist",
        "cifar10"; or ``folder:PATH``, a folder of pictures (``folders``),
        whatever ``source`` says.
      source: "tfds", "idx", or "auto", which tries in turn: IDX files in
        ``idx_dir``; TFDS data already prepared in ``data_dir``; the Debian
        IDX copy of the dataset; a TFDS download into ``data_dir``.
      data_dir: the TFDS data directory (TFDS's default when None).
      idx_dir: a directory holding ``train-images-idx3-ubyte[.gz]``,
        ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
        ``t10k-labels-idx1-ubyte[.gz]``.
      part: which examples to keep (default: all).
      num_classes: the class count; 0 takes the dataset's (TFDS's metadata,
        the catalog's for IDX files, a folder's class folders). Every
        label must lie in ``[0, num_classes)``.
      image_size, image_channels: a folder's pictures are converted to these.
      held_out: the test pictures held out of a folder without ``test/``.

    Raises:
      ValueError: an unknown ``source``.
      folders.FolderError: a folder that is not a dataset, or an unreadable
        picture (named).
      idx.IdxError: an IDX file that exists but is truncated or corrupt, or holds
        a label outside the classes.
      DatasetError: no source could provide the data (lists what was tried),
        the class count is unknown or disagrees with TFDS's, or the train and
        test images differ in shape.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if folders.is_folder(name):
        return _load_folder(name, part, num_classes, image_size, image_channels, held_out)
    debian_dir = DEBIAN_IDX_DIRS.get(name)
    if source == "idx":
        plan = [("idx", idx_dir or debian_dir)] if idx_dir or debian_dir else []
    elif source == "tfds":
        plan = [("tfds", True)]
    else:
        plan = [("idx", idx_dir)] if idx_dir else []
        plan.append(("tfds", False))
        if debian_dir and debian_dir != idx_dir:
            plan.append(("idx", debian_dir))
        plan.append(("tfds", True))
    from cnnflat_jax.data import tfds_source

    attempts: list[str] = []
    for kind, arg in plan:
        if kind == "idx" and not paths.is_directory(arg):
            attempts.append(f"IDX files in {arg}: no such directory")
            continue
        try:
            dataset = (
                idx.load(name, arg, part, num_classes)
                if kind == "idx"
                else tfds_source.load(name, data_dir, part, num_classes, download=arg)
            )
        except tfds_source.NotAvailable as e:
            attempts.append(f"TFDS {name!r} ({'download' if arg else 'prepared copy'}): {e}")
            continue
        logging.info("Loaded %s from %s", name, dataset.source)
        return dataset
    raise DatasetError(_not_found_message(name, source, attempts))


def load_data(config: ml_collections.ConfigDict, data_shards: int) -> Dataset:
    """This process's part of ``config``'s dataset (see ``shards``), with its
    pixels permuted when ``config.permute_pixels``; its training split
    streams when ``config.input_pipeline == "grain"``."""
    part = Part(
        num_train=config.num_train_examples,
        num_test=config.num_test_examples,
        shard_count=data_shards,
        shards=shards.process_shards(data_shards),
    )
    if config.input_pipeline == "grain":
        return load_records(
            config.dataset,
            array_record_dir=config.array_record_dir or None,
            data_dir=config.data_dir or None,
            part=part,
            num_classes=config.num_classes,
            permute_pixels=config.permute_pixels,
            image_shape=(*config.image_size, config.image_channels),
        )
    data = load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir or None,
        idx_dir=config.idx_dir or None,
        part=part,
        num_classes=config.num_classes,
        image_size=tuple(config.image_size),
        image_channels=config.image_channels,
        held_out=config.validation_examples,
    )
    if not config.permute_pixels:
        return data
    train = Arrays(transforms.permute_pixels(data.train.images), data.train.labels)
    return dataclasses.replace(
        data, train=train, test_images=transforms.permute_pixels(data.test_images)
    )


def load_records(
    name: str,
    *,
    array_record_dir: str | None = None,
    data_dir: str | None = None,
    part: Part = Part(),
    num_classes: int = 0,
    permute_pixels: bool = False,
    image_shape: tuple[int, int, int] = (28, 28, 1),
) -> Dataset:
    """``part`` of ``name``, its training split left in its random-access source.

    The test split is read into memory; the training split is
    ``train_records``, read only as batches are asked for.

    Args:
      name: the dataset's TFDS catalog name.
      array_record_dir: a directory that ``python -m cnnflat_jax.array_records``
        wrote; None reads TFDS's ArrayRecord data source from ``data_dir``.
      data_dir: the TFDS data directory (TFDS's default when None).
      part: which examples to keep (default: all).
      num_classes: the class count; 0 takes the dataset's.
      permute_pixels: shuffle every image's pixels by one fixed permutation.
      image_shape: a folder dataset's records must hold pictures of this shape
        (the config's size and channels).

    Raises:
      DatasetError: no such files or prepared copy (says how to make one), or
        they hold another dataset or class count.
      array_records.RecordError: a damaged ArrayRecord file.
    """
    folder_classes = ()
    if array_record_dir:
        info = array_records.read_info(array_record_dir)
        open_split, counts, classes, source, folder_classes = array_records.open_written(
            name, array_record_dir, info, image_shape
        )
    elif folders.is_folder(name):
        raise DatasetError(
            f"the grain pipeline streams a folder's pictures from ArrayRecord files: "
            f"python -m cnnflat_jax.array_records --dataset {name} --out_dir DIR "
            "(with the config's --image_size, --image_channels and --validation_examples), "
            "then --config.array_record_dir=DIR"
        )
    else:
        from cnnflat_jax.data import tfds_source

        open_split, counts, classes, source = tfds_source.records(name, data_dir)
    if num_classes not in (0, classes):
        raise DatasetError(
            f"config.num_classes={num_classes}, but {source} has {classes} classes; "
            "leave it 0 to take the dataset's count"
        )
    totals, records = {}, {}
    for split in ("train", "test"):
        totals[split], start, stop = part.bounds(split, counts[split])
        records[split] = dataclasses.replace(
            open_split(split, np.arange(start, stop)), permute_pixels=permute_pixels
        )
    test_images, test_labels = records["test"].read()
    logging.info("Streaming %s from %s", name, source)
    return Dataset(
        name=name, source=source, num_classes=classes, train=records["train"],
        test_images=test_images, test_labels=test_labels,
        train_total=totals["train"], test_total=totals["test"], folder_classes=folder_classes,
    )  # fmt: skip


def _hwc(shape) -> str:
    return "x".join(map(str, shape))


def _load_folder(name, part, num_classes, image_size, channels, held_out) -> Dataset:
    listing = folders.list_pictures(name, held_out)
    classes = len(listing.class_names)
    if num_classes not in (0, classes):
        raise DatasetError(
            f"config.num_classes={num_classes}, but {name} has {classes} class folders; "
            "leave it 0 to take the folder's count"
        )
    arrays, totals = {}, {}
    for split in folders.SPLITS:
        totals[split], start, stop = part.bounds(split, len(listing.files[split]))
        images = listing.read(split, start, stop, channels, image_size)
        arrays[split] = (images, listing.labels[split][start:stop])
    where = {split: f"{name} {split}" for split in folders.SPLITS}
    source = f"pictures in {folders.root(name)} ({_hwc((*image_size, channels))})"
    dataset = from_arrays(name, source, classes, arrays, totals, where)
    return dataclasses.replace(
        dataset, folder_classes=tuple(listing.class_names), contents=listing.contents()
    )


def _not_found_message(name: str, source: str, attempts: list[str]) -> str:
    tried = "\n".join(f"  - {a}" for a in attempts) or "  - nothing: no IDX directory given"
    fixes = [
        "pass a directory of MNIST-format IDX files: --config.idx_dir=/path/to/dir",
        "or go online so TFDS can download it (--config.data_source=tfds), "
        "or point --config.data_dir at a TFDS data directory where it is prepared",
    ]
    if name == "fashion_mnist":
        fixes.insert(0, "install Debian's copy: sudo apt-get install -y dataset-fashion-mnist")
    fix = "\n".join(f"  - {f}" for f in fixes)
    return f"could not load dataset {name!r} (source={source!r}). Tried:\n{tried}\nTo fix:\n{fix}"
