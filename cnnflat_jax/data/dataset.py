"""A loaded dataset (``Dataset``), which part of it a process loads (``Part``),
and the error of a dataset that no source could provide."""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnflat_jax.data import catalog, shards
from cnnflat_jax.data.examples import Arrays, Examples
from cnnflat_jax.errors import Error


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
    ``array_records.Records`` (the grain pipeline), one interface either way
    (``examples.Examples``).
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
    # A folder dataset's pictures as a digest (``folders.Listing.contents``): part
    # of the run's identity, since its name is only a path. Empty for others.
    contents: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test_images.shape[1:])

    @property
    def class_names(self) -> list[str]:
        return list(self.folder_classes) or catalog.class_names(self.name, self.num_classes)


def from_arrays(name, source, num_classes, arrays, totals, where) -> Dataset:
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
