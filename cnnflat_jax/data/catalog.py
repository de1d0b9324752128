"""What the project knows of each dataset it names, without reading it: image
shape, classes and their names, split sizes, and where Debian keeps a copy.

The input pipeline reads it for class counts and names (IDX files carry
neither) and for Debian's IDX copy; the TPU pre-flight check for the shapes
and sizes it compiles for. Only the standard library is imported.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
    """One dataset: its images' ``(H, W, C)``, its class names (TFDS's label
    names, in label order), its train and test split sizes, and the directory
    of MNIST-format IDX files a Debian package installs, if one does."""

    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    train_examples: int
    test_examples: int
    debian_idx_dir: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


CATALOG = {
    "mnist": Entry((28, 28, 1), tuple(str(i) for i in range(10)), 60_000, 10_000),
    "fashion_mnist": Entry(
        (28, 28, 1),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        60_000, 10_000,
        debian_idx_dir="/usr/share/datasets/fashion-mnist",  # apt-get install dataset-fashion-mnist
    ),
    "kmnist": Entry(
        (28, 28, 1), ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), 60_000, 10_000
    ),
    "cifar10": Entry(
        (32, 32, 3),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        50_000, 10_000,
    ),
}  # fmt: skip

# Where Debian packages put IDX copies, by dataset (a dict the tests may point elsewhere).
DEBIAN_IDX_DIRS = {name: e.debian_idx_dir for name, e in CATALOG.items() if e.debian_idx_dir}


def class_names(dataset: str, num_classes: int) -> list[str]:
    """``dataset``'s class names; ``"0"``, ``"1"``, ... where they are not known."""
    entry = CATALOG.get(dataset)
    if entry is None or entry.num_classes != num_classes:
        return [str(i) for i in range(num_classes)]
    return list(entry.class_names)
