"""Image datasets as ArrayRecord files: random access for the Grain input pipeline.

A directory written by this module's command holds ``train.array_record``,
``test.array_record`` and ``dataset.json``. Each record is one example: its
label as a little-endian int32, then its image's uint8 pixels in HWC order;
``dataset.json`` gives the dataset's name, class count, image shape and the
splits' sizes. Write it from IDX files (Debian's Fashion-MNIST copy here)::

    python -m cnnflat_jax.array_records --dataset fashion_mnist \\
        --idx_dir /usr/share/datasets/fashion-mnist --out_dir data/fashion_mnist

``--repeat K`` writes the training set K times over (a larger dataset with
the same content, for memory benchmarks). ``Records`` reads any random-access
source (these files through Grain, or TFDS's ArrayRecord data source) one
batch of examples at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cnnflat_jax import paths
from cnnflat_jax.data import folders, transforms
from cnnflat_jax.data.dataset import DatasetError
from cnnflat_jax.data.examples import check_labels
from cnnflat_jax.errors import Error

__all__ = [
    "INFO_FILE",
    "SPLITS",
    "RECORD_FORMAT",
    "RecordError",
    "split_path",
    "Records",
    "read_info",
    "open_split",
    "write",
]

INFO_FILE = "dataset.json"
SPLITS = ("train", "test")
_LABEL_BYTES = 4
RECORD_FORMAT = "int32 little-endian label, then the image's uint8 pixels in HWC order"
# Dispatches that Grain reads ahead of the training loop, in a background thread.
PREFETCH_DISPATCHES = 2


class RecordError(Error, ValueError):
    """A missing, unreadable or malformed ArrayRecord file or record."""


def split_path(directory: str, split: str) -> str:
    return paths.join(directory, f"{split}.array_record")


@dataclasses.dataclass(frozen=True)
class Records:
    """A split's examples in a random-access source, read only when asked for.

    Example ``j`` is the source's record ``ids[j]``; ``decode`` turns a list
    of records into ``(images (n, H, W, C) uint8, labels (n,) int32)``.
    """

    source: Any  # len(source), source.__getitems__(list[int]) -> list of records.
    decode: Callable[[Sequence[Any], np.ndarray], tuple[np.ndarray, np.ndarray]]
    ids: np.ndarray
    image_shape: tuple[int, int, int]
    where: str  # The source, as errors name it.
    permute_pixels: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray | slice) -> Records:
        """The examples at ``positions``, still unread."""
        return dataclasses.replace(self, ids=self.ids[positions])

    def read(self, positions: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """The examples at ``positions`` (any shape): images ``(*shape, H, W, C)``
        and labels ``shape``."""
        ids = np.asarray(self.ids[positions])
        flat = ids.ravel()
        try:
            records = self.source.__getitems__(flat.tolist())
        except Exception as e:  # The ArrayRecord reader raises bare RuntimeErrors.
            raise RecordError(f"{self.where}: cannot read records {_ids(flat)}: {e}") from None
        images, labels = self.decode(records, flat)
        if self.permute_pixels:
            images = transforms.permute_pixels(images)
        return images.reshape(*ids.shape, *self.image_shape), labels.reshape(ids.shape)

    def stream(
        self, read_dispatch: Callable[[int], Any], count: int, start: int, state: dict | None
    ):
        """Dispatches ``0 .. count - 1`` as a Grain iterator that reads
        ``PREFETCH_DISPATCHES`` ahead in a background thread, going on from
        ``state`` (its ``get_state()`` after dispatch ``start - 1``; None when
        ``start`` is 0)."""
        import grain

        dispatches = grain.MapDataset.range(count).map(read_dispatch)
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_DISPATCHES)
        iterator = iter(dispatches.to_iter_dataset(options))
        if state is not None:
            iterator.set_state(state)
        return iterator


def read_info(directory: str) -> dict[str, Any]:
    """``directory``'s ``dataset.json``, checked to name both split files.

    Raises:
      RecordError: a missing or unreadable ``dataset.json`` or split file.
    """
    path = paths.join(directory, INFO_FILE)
    try:
        with paths.open_binary(path) as f:
            info = json.load(f)
        image_shape = tuple(int(n) for n in info["image_shape"])
        counts = {split: int(info["splits"][split]) for split in SPLITS}
        num_classes = int(info["num_classes"])
    except FileNotFoundError:
        raise RecordError(
            f"{directory} has no {INFO_FILE}: not a directory written by "
            "python -m cnnflat_jax.array_records"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    for split in SPLITS:
        if not paths.is_file(split_path(directory, split)):
            raise RecordError(f"{directory}: no {split}.array_record beside {INFO_FILE}")
    return {**info, "image_shape": image_shape, "splits": counts, "num_classes": num_classes}


def open_split(directory: str, split: str, info: dict[str, Any], ids: np.ndarray) -> Records:
    """The examples ``ids`` of ``split`` in a directory this module wrote.

    Raises:
      RecordError: the file cannot be opened or holds another number of
        records than ``dataset.json`` says; a record read later that is not
        one example of ``info``'s shape and classes names its file and index.
    """
    import grain

    path = split_path(directory, split)
    try:  # The ArrayRecord reader reads local files: a gs:// file is downloaded first.
        source = grain.sources.ArrayRecordDataSource([paths.local_copy(path)])
        count = len(source)
    except Exception as e:  # The ArrayRecord reader raises bare RuntimeErrors.
        raise RecordError(f"{path} is not a readable ArrayRecord file ({e})") from None
    if count != info["splits"][split]:
        raise RecordError(
            f"{path} holds {count} records but {INFO_FILE} says {info['splits'][split]}"
        )
    shape, num_classes = info["image_shape"], info["num_classes"]
    size = _LABEL_BYTES + int(np.prod(shape))

    def decode(records: Sequence[bytes], record_ids: np.ndarray):
        for record, i in zip(records, record_ids):
            if len(record) != size:
                raise RecordError(
                    f"{path}: record {i} has {len(record)} bytes, not {size} "
                    f"({RECORD_FORMAT}, {'x'.join(map(str, shape))} pixels)"
                )
        raw = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
        labels = raw[:, :_LABEL_BYTES].copy().view("<i4")[:, 0].astype(np.int32)
        check_labels(labels, num_classes, path, RecordError, record_ids, item="record")
        return raw[:, _LABEL_BYTES:].reshape(len(records), *shape), labels

    return Records(source, decode, ids, shape, path)


def open_written(name: str, directory: str, info: dict[str, Any], image_shape):
    """``(open_split, counts, num_classes, source, class_names)`` of a directory
    that ``write`` wrote for ``name`` (``info``, its ``read_info``); a folder's
    records must hold pictures of ``image_shape``."""
    if not _same_dataset(info.get("dataset"), name):
        raise DatasetError(
            f"{directory} holds {info.get('dataset')!r}, not {name!r} "
            f"({INFO_FILE}); set --config.dataset or --config.array_record_dir"
        )
    class_names = ()
    if folders.is_folder(name):
        class_names = _folder_classes(name, directory, info, image_shape)

    def open_split_ids(split, ids):
        return open_split(directory, split, info, ids)

    source = f"ArrayRecord files in {directory}"
    return open_split_ids, info["splits"], info["num_classes"], source, class_names


def _same_dataset(written: object, name: str) -> bool:
    """Whether records written for ``written`` hold ``name`` (a folder by its absolute path)."""
    if not isinstance(written, str) or not (folders.is_folder(written) and folders.is_folder(name)):
        return written == name
    return paths.absolute(folders.root(written)) == paths.absolute(folders.root(name))


def _folder_classes(name: str, directory: str, info: dict, image_shape) -> tuple[str, ...]:
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


def _ids(ids: np.ndarray) -> str:
    """A few record indices, for an error message."""
    shown = ", ".join(map(str, ids[:3]))
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > 3 else shown


def write(
    out_dir: str,
    name: str,
    num_classes: int,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    repeat: int = 1,
    class_names: list[str] | None = None,
) -> None:
    """Writes ``splits`` (``{split: (images NHWC uint8, labels)}``) to ``out_dir``,
    the training split ``repeat`` times over; ``class_names``, when given, go
    into ``dataset.json`` (a folder dataset's, which only its folders name).

    Everything is written to a temporary directory beside ``out_dir`` and
    renamed into place at the end, so a failed or interrupted write leaves
    no partial dataset.

    Raises:
      RecordError: ``out_dir`` exists and is not empty.
    """
    from array_record.python import array_record_module

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise RecordError(f"{out_dir} exists and is not an empty directory; choose another")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        counts = {}
        for split, (images, labels) in splits.items():
            times = repeat if split == "train" else 1
            labels = np.asarray(labels, "<i4").reshape(-1, 1).view(np.uint8)
            records = np.concatenate([labels, images.reshape(len(images), -1)], axis=1)
            path = split_path(os.path.abspath(out_dir), split)
            try:  # group_size:1 makes every record its own chunk: cheap random reads.
                writer = array_record_module.ArrayRecordWriter(
                    split_path(staging, split), "group_size:1,uncompressed"
                )
                for _ in range(times):
                    for record in records:
                        writer.write(record.tobytes())
                writer.close()
            except RuntimeError as e:  # A full disk, as the ArrayRecord writer reports it.
                raise RecordError(f"could not write {path}: {e}; nothing was left behind") from None
            counts[split] = len(records) * times
        info = {
            "dataset": name,
            "num_classes": num_classes,
            "image_shape": list(splits["train"][0].shape[1:]),
            "splits": counts,
            "record": RECORD_FORMAT,
            "train_repeat": repeat,
            **({"class_names": list(class_names)} if class_names else {}),
        }
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's is private.
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # Empty, checked above.
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
