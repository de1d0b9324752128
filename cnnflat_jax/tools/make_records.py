"""The ``python -m cnnflat_jax.array_records`` command: IDX files, or a folder of
pictures (``--dataset folder:PATH``), -> ArrayRecord files."""

from __future__ import annotations

from cnnflat_jax.data import array_records, input_pipeline
from cnnflat_jax.tools import command


def main() -> None:
    """The command line (flags are defined here, so importing the module defines none)."""
    from absl import app, flags

    dataset = flags.DEFINE_string(
        "dataset", "fashion_mnist", "A TFDS name, or folder:PATH (a folder of pictures)."
    )
    idx_dir = flags.DEFINE_string("idx_dir", None, "MNIST-format IDX files (default: Debian's).")
    out_dir = flags.DEFINE_string("out_dir", None, "The directory to write (new or empty).")
    num_classes = flags.DEFINE_integer("num_classes", 0, "0 = the dataset's own count.")
    repeat = flags.DEFINE_integer("repeat", 1, "Write the training set this many times over.")
    # A folder's pictures are converted as train.py's config would convert them.
    image_size = flags.DEFINE_list("image_size", ["28", "28"], "folder: HEIGHT,WIDTH.")
    image_channels = flags.DEFINE_enum("image_channels", "1", ["1", "3"], "folder: 1 or 3.")
    held_out = flags.DEFINE_integer(
        "validation_examples", 0, "folder without test/: the test pictures held out (N > 0)."
    )

    def run(argv):
        if len(argv) > 1 or not out_dir.value or repeat.value < 1:
            command.usage(
                "python -m cnnflat_jax.array_records --out_dir DIR [--dataset NAME] "
                "[--idx_dir DIR] [--repeat K>=1] [--dataset folder:PATH --image_size H,W "
                "--image_channels 1|3 --validation_examples N]"
            )
        size = tuple(int(n) for n in image_size.value if n.isdigit() and int(n) > 0)
        if len(size) != 2 or len(image_size.value) != 2:
            command.fail(f"--image_size={','.join(image_size.value)}: not HEIGHT,WIDTH (>= 1)")
        with command.one_line_failures():
            data = input_pipeline.load_dataset(
                dataset.value, source="idx", idx_dir=idx_dir.value, num_classes=num_classes.value,
                image_size=size, image_channels=int(image_channels.value), held_out=held_out.value,
            )  # fmt: skip
            splits = {
                "train": (data.train.images, data.train.labels),
                "test": (data.test_images, data.test_labels),
            }
            array_records.write(
                out_dir.value, data.name, data.num_classes, splits, repeat.value,
                class_names=list(data.folder_classes),
            )  # fmt: skip
        print(f"wrote {out_dir.value}: {len(data.train.labels) * repeat.value} train and "
              f"{len(data.test_labels)} test records from {data.source}")  # fmt: skip

    app.run(run)
