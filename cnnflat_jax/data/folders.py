"""A folder of pictures as a dataset: ``config.dataset="folder:PATH"``.

The layout is Keras', torchvision's and TFDS's, a folder per class::

    PATH/train/CLASS/*.png|jpg|jpeg    PATH/test/CLASS/*.png|jpg|jpeg

or a single ``PATH/CLASS/*`` with no test folder: then the last
``held_out`` pictures of a fixed shuffle are the test split (and the run's
``validation_examples`` holds out as many again from the rest for
validation). Class names are the class folders' names in sorted order, and
labels their positions in it. A class folder's subfolders are read too,
as Keras and torchvision read them (not through a symbolic link, which
could loop). Every picture is converted to one channel count and size
(``pictures.read_picture``). Other files are skipped, as those readers skip
them; a picture that cannot be read, or that is not a regular file (a FIFO
would block the run), is an error naming it, and so is a class folder of
the training pictures that holds none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

import numpy as np

from cnnflat_jax import paths
from cnnflat_jax.data import pictures
from cnnflat_jax.errors import Error

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
# The fixed shuffle of a folder's pictures: the same for every run and seed, so
# that runs of other seeds train and test on the same pictures.
_ORDER_SEED = 0


class FolderError(Error, ValueError):
    """A folder that is not a dataset of pictures, or a picture that cannot be read."""


def is_folder(dataset: str) -> bool:
    """Whether ``dataset`` names a folder (``folder:PATH``)."""
    return dataset.startswith(PREFIX)


def root(dataset: str) -> str:
    """The folder that ``folder:PATH`` names."""
    return dataset.removeprefix(PREFIX)


@dataclasses.dataclass(frozen=True)
class Listing:
    """The pictures of a folder dataset, before any is read: each split's
    files and labels in the order the dataset keeps them."""

    class_names: list[str]
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]

    def contents(self) -> str:
        """A digest of what the pictures are: each split's files by path, size
        and modification time (a bucket's objects: path and size). A picture
        added, removed, replaced or edited changes it."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for path in self.files[split]:
                if paths.is_remote(path):
                    facts = (paths.size(path),)
                else:
                    facts = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
                digest.update(f"{split}\0{path}\0{facts}\n".encode())
        return digest.hexdigest()

    def read(self, split: str, start: int, stop: int, channels: int, size) -> np.ndarray:
        """Pictures ``start .. stop - 1`` of ``split`` as uint8 ``(N, H, W, channels)``."""
        images = np.zeros((stop - start, *size, channels), np.uint8)
        for i, path in enumerate(self.files[split][start:stop]):
            with paths.open_binary(path) as f:
                images[i] = pictures.read_picture(f, channels, size, name=path)
        return images


def list_pictures(dataset: str, held_out: int) -> Listing:
    """The splits of the folder ``dataset`` names (see the module's docstring).

    Args:
      dataset: ``folder:PATH``.
      held_out: a single folder's test pictures (it must be > 0 then); unused
        where the folder has ``train/`` and ``test/``.

    Raises:
      FolderError: no such folder; no class folders, or no pictures; a test
        class that the training split lacks; a single folder without
        ``held_out``, or too small for it.
    """
    top = root(dataset)
    if not paths.is_directory(top):
        raise FolderError(f"{dataset}: {top} is not a directory (a folder of class folders)")
    names = paths.list_names(top)
    if "train" in names and paths.is_directory(paths.join(top, "train")):
        if "test" not in names or not paths.is_directory(paths.join(top, "test")):
            raise FolderError(
                f"{dataset}: {top} has train/ but no test/ folder; add PATH/test/CLASS/... "
                "or put the class folders directly in PATH (then validation_examples "
                "pictures are held out for test)"
            )
        class_names = _class_folders(paths.join(top, "train"), dataset)
        files, labels = {}, {}
        for split in SPLITS:
            folder = paths.join(top, split)
            unknown = sorted(set(_class_folders(folder, dataset)) - set(class_names))
            if unknown:
                raise FolderError(
                    f"{dataset}: {folder} has class folders that train/ lacks: {', '.join(unknown)}"
                )
            files[split], labels[split] = _pictures(folder, class_names, split == "train")
        order = np.random.default_rng(_ORDER_SEED).permutation(len(files["train"]))
        files["train"] = [files["train"][i] for i in order]
        labels["train"] = labels["train"][order]
    else:
        class_names = _class_folders(top, dataset)
        every, every_label = _pictures(top, class_names, every_class=True)
        if held_out <= 0:
            raise FolderError(
                f"{dataset}: {top} has no train/ and test/ folders, so its test pictures are "
                "held out of it: set --config.validation_examples=N (N pictures for test, "
                "and N more for validation)"
            )
        if len(every) <= 2 * held_out:
            raise FolderError(
                f"{dataset}: {len(every)} pictures are too few to hold out "
                f"{held_out} for test and {held_out} for validation"
            )
        order = np.random.default_rng(_ORDER_SEED).permutation(len(every))
        cut = len(every) - held_out
        files = {"train": [every[i] for i in order[:cut]], "test": [every[i] for i in order[cut:]]}
        labels = {"train": every_label[order[:cut]], "test": every_label[order[cut:]]}
    for split in SPLITS:
        if not files[split]:
            raise FolderError(
                f"{dataset}: no {split} pictures ({', '.join(EXTENSIONS)}) in the class folders"
            )
    return Listing(class_names, files, labels)


def _class_folders(folder: str, dataset: str) -> list[str]:
    """The class folders in ``folder``, sorted by name."""
    names = sorted(
        n for n in paths.list_names(folder)
        if not n.startswith(".") and paths.is_directory(paths.join(folder, n))
    )  # fmt: skip
    if len(names) < 2:
        raise FolderError(
            f"{dataset}: {folder} has {len(names)} class folder{'s' * (len(names) != 1)}; a "
            "dataset needs one folder per class, at least two"
        )
    return names


def _pictures(
    folder: str, class_names: list[str], every_class: bool
) -> tuple[list[str], np.ndarray]:
    """Every picture under ``folder/CLASS/`` (by class, then path), and its label;
    with ``every_class``, a class folder without pictures is refused (a test
    split may lack a class)."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_folder = paths.join(folder, name)
        found = _class_pictures(class_folder) if paths.is_directory(class_folder) else []
        if every_class and not found:
            raise FolderError(
                f"{class_folder} holds no pictures ({', '.join(EXTENSIONS)}): a class needs "
                "training pictures; remove the folder or add some"
            )
        files += found
        labels += [label] * len(found)
    return files, np.array(labels, np.int32)


def _class_pictures(folder: str) -> list[str]:
    """The pictures in ``folder`` and its subfolders, in sorted order at each level."""
    found = []
    for name in sorted(paths.list_names(folder)):
        path = paths.join(folder, name)
        if name.startswith("."):
            continue
        local = not paths.is_remote(path)
        if paths.is_directory(path):
            if not (local and os.path.islink(path)):  # A link could loop.
                found += _class_pictures(path)
        elif name.lower().endswith(EXTENSIONS):
            if local and not stat.S_ISREG(os.stat(path).st_mode):
                raise FolderError(f"{path}: not a regular file (a FIFO or a device never ends)")
            found.append(path)
    return found
