"""Datasets -> uint8 arrays and record sources; the only module that knows about TFDS.

The memory pipeline loads whole splits into host memory, from a TFDS catalog
dataset (prepared in ``data_dir``, or downloaded when online), a local
directory of MNIST-format IDX files, such as Debian's
``dataset-fashion-mnist`` package, or a folder of pictures (``folders``).
The grain pipeline leaves the training split in a random-access source, read
batch by batch as Grain streams it: ArrayRecord files written by
``array_records``, or TFDS's ArrayRecord data source. TensorFlow is imported
only for TFDS, and is kept off accelerators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import os
import shutil
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import paths
from cnnflat_jax.data import array_records, folders, shards, transforms
from cnnflat_jax.data.examples import Arrays, check_labels
from cnnflat_jax.data.idx import IdxError, read_idx
from cnnflat_jax.errors import Error

SOURCES = ("auto", "tfds", "idx")
PIPELINES = ("memory", "grain")

# Where Debian packages put IDX copies (`apt-get install dataset-fashion-mnist`).
DEBIAN_IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}

# IDX files carry no class list. Their class count is the dataset's own, from
# this table (TFDS's counts), or the caller's ``num_classes``; never the
# largest label seen, so one bad label cannot grow the model.
IDX_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "kmnist": 10}

# Class names of the datasets the configs name (TFDS's label names).
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    "cifar10": [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ],
}  # fmt: skip


def class_names(dataset: str, num_classes: int) -> list[str]:
    """``dataset``'s class names; ``"0"``, ``"1"``, ... where they are not known."""
    names = CLASS_NAMES.get(dataset, [])
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# A split's training examples, whichever pipeline loaded them (``examples``).
Examples = Arrays | array_records.Records


class DatasetError(Error, RuntimeError):
    """No source could provide the dataset; the message says what was tried."""


@dataclasses.dataclass(frozen=True)
class Part:
    """Which examples of each split to load.

    The first ``num_train``/``num_test`` examples (0 = all) are cut into
    ``shard_count`` contiguous shards (``shards.shard_bounds``) and the
    ``shards`` run of them is loaded; in a multi-process run each process
    loads only its own run.
    """

    num_train: int = 0
    num_test: int = 0
    shard_count: int = 1
    shards: range = range(1)

    def bounds(self, split: str, size: int) -> tuple[int, int, int]:
        """``(total, start, stop)`` for a split of ``size`` examples."""
        cap = self.num_train if split == "train" else self.num_test
        total = min(size, cap) if cap else size
        bounds = shards.shard_bounds(total, self.shard_count)
        return total, int(bounds[self.shards.start]), int(bounds[self.shards.stop])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset: this process's part.

    Images are uint8 NHWC ``(N, H, W, C)``; labels are int32 ``(N,)`` in
    ``[0, num_classes)``. ``train_total``/``test_total`` count the examples
    of all processes' parts together. The test split is in host memory; the
    training split is ``examples.Arrays`` (the memory pipeline) or
    ``array_records.Records`` (the grain pipeline), one interface either way.
    """

    name: str
    source: str
    num_classes: int
    train: Examples
    test_images: np.ndarray
    test_labels: np.ndarray
    train_total: int
    test_total: int
    # A folder dataset's class folders, in label order (its pictures were resized).
    folder_classes: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test_images.shape[1:])

    @property
    def class_names(self) -> list[str]:
        return list(self.folder_classes) or class_names(self.name, self.num_classes)


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
        ``IDX_NUM_CLASSES`` for IDX files, a folder's class folders). Every
        label must lie in ``[0, num_classes)``.
      image_size, image_channels: a folder's pictures are converted to these.
      held_out: the test pictures held out of a folder without ``test/``.

    Raises:
      ValueError: an unknown ``source``.
      folders.FolderError: a folder that is not a dataset, or an unreadable
        picture (named).
      IdxError: an IDX file that exists but is truncated or corrupt, or holds
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
    attempts: list[str] = []
    for kind, arg in plan:
        if kind == "idx" and not paths.is_directory(arg):
            attempts.append(f"IDX files in {arg}: no such directory")
            continue
        try:
            dataset = (
                _load_idx(name, arg, part, num_classes)
                if kind == "idx"
                else _load_tfds(name, data_dir, part, num_classes, download=arg)
            )
        except _NotAvailable as e:
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
        open_split, counts, classes, source = _array_record_files(name, array_record_dir, info)
        if folders.is_folder(name):
            folder_classes = _folder_records(name, array_record_dir, info, image_shape)
    elif folders.is_folder(name):
        raise DatasetError(
            f"the grain pipeline streams a folder's pictures from ArrayRecord files: "
            f"python -m cnnflat_jax.array_records --dataset {name} --out_dir DIR "
            "(with the config's --image_size, --image_channels and --validation_examples), "
            "then --config.array_record_dir=DIR"
        )
    else:
        open_split, counts, classes, source = _tfds_records(name, data_dir)
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


def _array_record_files(name: str, directory: str, info: dict):
    """``(open_split, counts, num_classes, source)`` of an ``array_records`` directory."""
    if not _same_dataset(info.get("dataset"), name):
        raise DatasetError(
            f"{directory} holds {info.get('dataset')!r}, not {name!r} "
            f"({array_records.INFO_FILE}); set --config.dataset or --config.array_record_dir"
        )

    def open_split(split, ids):
        return array_records.open_split(directory, split, info, ids)

    return open_split, info["splits"], info["num_classes"], f"ArrayRecord files in {directory}"


def _tfds_records(name: str, data_dir: str | None):
    """``(open_split, counts, num_classes, source)`` of TFDS's ArrayRecord data source."""
    make_files = (
        "write ArrayRecord files from IDX files and pass their directory: "
        f"python -m cnnflat_jax.array_records --dataset {name} --out_dir DIR, then "
        "--config.array_record_dir=DIR; or prepare it with TFDS: "
        f"tfds build {name} --file_format=array_record"
    )
    if not _tfds_prepared(name, data_dir):
        raise DatasetError(
            f"the grain pipeline needs {name!r} in a random-access format, and TFDS has no "
            f"prepared copy in {_tfds_data_dir(data_dir)}: {make_files}"
        )
    _import_tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetError(
            f"TFDS {name} in {builder.data_dir} is prepared as {file_format.value}, which has "
            f"no random access: {make_files}"
        )
    classes = builder.info.features["label"].num_classes

    def open_split(split, ids):
        source = builder.as_data_source(split=split)
        where = f"TFDS {name} {split}"

        def decode(examples, record_ids):
            labels = np.array([e["label"] for e in examples], np.int32)
            check_labels(labels, classes, where, array_records.RecordError, record_ids, "record")
            return np.stack([e["image"] for e in examples]), labels

        shape = tuple(builder.info.features["image"].shape)
        return array_records.Records(source, decode, ids, shape, where)

    counts = {split: builder.info.splits[split].num_examples for split in ("train", "test")}
    return open_split, counts, classes, f"TFDS {name} {builder.info.version} (ArrayRecord)"


def _same_dataset(written: object, name: str) -> bool:
    """Whether records written for ``written`` hold ``name`` (a folder by its absolute path)."""
    if not isinstance(written, str) or not (folders.is_folder(written) and folders.is_folder(name)):
        return written == name
    return paths.absolute(folders.root(written)) == paths.absolute(folders.root(name))


def _folder_records(name: str, directory: str, info: dict, image_shape) -> tuple[str, ...]:
    """The class names of a folder's records, checked to hold ``image_shape`` pictures."""
    if tuple(info["image_shape"]) != tuple(image_shape):
        raise DatasetError(
            f"{directory} holds {_hwc(info['image_shape'])} pictures of {name}, but the config "
            f"asks for {_hwc(image_shape)} (image_size, image_channels); write the records "
            "again with those, or set the config to match"
        )
    return tuple(info.get("class_names", ()))


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
    dataset = _dataset(name, source, classes, arrays, totals, where)
    return dataclasses.replace(dataset, folder_classes=tuple(listing.class_names))


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


def _find_idx_file(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = paths.join(directory, candidate)
        if paths.exists(path):
            return path
    raise IdxError(f"{directory}: no {stem} or {stem}.gz")


def _load_idx(name: str, directory: str, part: Part, num_classes: int) -> Dataset:
    num_classes = num_classes or IDX_NUM_CLASSES.get(name, 0)
    if not num_classes:
        raise DatasetError(
            f"IDX files carry no class count and {name!r} is not one of "
            f"{sorted(IDX_NUM_CLASSES)}: set --config.num_classes"
        )
    arrays, totals, paths = {}, {}, {}
    for split, (images_stem, labels_stem) in _IDX_FILES.items():
        images_path = _find_idx_file(directory, images_stem)
        labels_path = _find_idx_file(directory, labels_stem)
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise IdxError(
                f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        check_labels(labels, num_classes, labels_path, IdxError)
        totals[split], start, stop = part.bounds(split, len(labels))
        arrays[split] = (images[start:stop, ..., None].copy(), labels[start:stop].astype(np.int32))
        paths[split] = images_path
    return _dataset(name, f"IDX files in {directory}", num_classes, arrays, totals, paths)


def _dataset(name, source, num_classes, arrays, totals, where) -> Dataset:
    """A ``Dataset`` from ``{split: (images, labels)}``, its train and test image
    shapes checked to agree (``where`` names each split's origin)."""
    shapes = {split: images.shape[1:] for split, (images, _) in arrays.items()}
    if shapes["train"] != shapes["test"]:
        raise DatasetError(
            f"{name}: the train images ({where['train']}) are "
            f"{'x'.join(map(str, shapes['train']))} but the test images ({where['test']}) are "
            f"{'x'.join(map(str, shapes['test']))}; both splits must have one image shape"
        )
    return Dataset(
        name=name,
        source=source,
        num_classes=num_classes,
        train=Arrays(*arrays["train"]),
        test_images=arrays["test"][0],
        test_labels=arrays["test"][1],
        train_total=totals["train"],
        test_total=totals["test"],
    )


class _NotAvailable(Exception):
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


def _load_tfds(
    name: str, data_dir: str | None, part: Part, num_classes: int, *, download: bool
) -> Dataset:
    if not download and not _tfds_prepared(name, data_dir):
        raise _NotAvailable(f"not prepared in {_tfds_data_dir(data_dir)}")
    _import_tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    root = _tfds_data_dir(data_dir)
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
        raise DatasetError(
            f"config.dataset={name}: not in the TFDS catalog{hint}; allowed: a TFDS catalog "
            "name or folder:PATH"
        ) from None
    except Exception as e:  # Network, disk, checksum: report and go on to the next source.
        raise _NotAvailable(f"download failed: {type(e).__name__}: {e}") from e
    info = builder.info
    classes = info.features["label"].num_classes
    if num_classes not in (0, classes):
        raise DatasetError(
            f"config.num_classes={num_classes}, but TFDS {name} has {classes} classes; "
            "leave it 0 to take TFDS's count"
        )
    splits, totals, selections = {}, {}, {}
    for split in ("train", "test"):
        selection = split
        if part != Part():  # Read only this part: TFDS slices by example index.
            totals[split], start, stop = part.bounds(split, info.splits[split].num_examples)
            selection = f"{split}[{start}:{stop}]"
        ds = builder.as_dataset(split=selection, shuffle_files=False).batch(10_000)
        batches = list(tfds.as_numpy(ds))
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
        selections[split] = f"TFDS {name} {selection}"
        check_labels(labels, classes, selections[split], IdxError)
        splits[split] = (images, labels)
        totals.setdefault(split, len(labels))
    source = f"TFDS {name} {info.version} in {builder.data_dir}"
    return _dataset(name, source, classes, splits, totals, selections)


def _tfds_data_dir(data_dir: str | None) -> str:
    """TFDS's data directory: ``data_dir``, else $TFDS_DATA_DIR, else its default."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )


def _tfds_prepared(name: str, data_dir: str | None) -> bool:
    """Whether ``name`` is prepared, found without ``tfds.builder``, which
    creates empty directories in the data directory as a side effect."""
    pattern = os.path.join(_tfds_data_dir(data_dir), name, "**", "dataset_info.json")
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
