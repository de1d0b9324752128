"""``config.dataset="folder:PATH"``: a folder of PNG and JPEG pictures, a folder per class.

The pictures are written here with Pillow from known arrays; what the loader
reads is held to those arrays (exactly for PNG, closely for JPEG), and runs
go through ``train.py``, ``export`` and ``predict`` in subprocesses.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import final_params
from PIL import Image

from cnnflat_jax.data import folders, input_pipeline, pictures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("bolt", "nut", "washer")  # Sorted: labels 0, 1, 2.


def picture(label, rng, size, channels):
    """A learnable picture: class ``label`` lights one horizontal band."""
    height, width = size
    pixels = rng.integers(0, 60, (height, width, channels), dtype=np.uint8)
    band = height // len(CLASSES)
    pixels[label * band : (label + 1) * band] += 180
    return pixels


def save(path, pixels):
    """Saves PNG losslessly, JPEG at quality 95; ``pixels`` (H, W, 1 or 3)."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(path, quality=95) if path.endswith(".jpg") else image.save(path)


def write_folder(root, counts, size=(8, 8), channels=1, seed=0, splits=("train", "test")):
    """``root/SPLIT/CLASS/NNN.png|jpg`` (every third a JPEG), ``counts[split]`` per
    class; ``splits=("",)`` writes ``root/CLASS/...``. Returns ``{path: pixels}``."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(counts[split]):
                path = os.path.join(folder, f"{i:03d}.{'jpg' if i % 3 == 2 else 'png'}")
                written[path] = picture(label, rng, size, channels)
                save(path, written[path])
    return written


def train(*flags, cwd=ROOT):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "smoke.py"), *FOLDER_RUN, *flags],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def module(name, *args):
    return subprocess.run(
        [sys.executable, "-m", f"cnnflat_jax.{name}", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


# The smoke config on every picture, batch 16, 3 epochs (grayscale 28x28 unless a
# test sets --config.image_size, --config.image_channels).
FOLDER_RUN = [
    "--config.num_train_examples=0", "--config.num_test_examples=0",
    "--config.batch_size=16", "--config.eval_batch_size=8", "--config.num_epochs=3",
]  # fmt: skip


def errors_of(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders") / "pictures"
    return root, write_folder(str(root), {"train": 22, "test": 6})


def test_pictures_load_as_written_with_labels_from_sorted_folder_names(folder):
    root, written = folder
    (root / "train" / "bolt" / "notes.txt").write_text("not a picture")  # Skipped.
    data = input_pipeline.load_dataset(f"folder:{root}", image_size=(8, 8), image_channels=1)
    assert data.class_names == list(CLASSES) and data.num_classes == 3
    assert data.train.images.shape == (66, 8, 8, 1) and data.test_images.shape == (18, 8, 8, 1)
    listing = folders.list_pictures(f"folder:{root}", held_out=0)
    for split, images, labels in (
        ("train", data.train.images, data.train.labels),
        ("test", data.test_images, data.test_labels),
    ):
        for path, image, label in zip(listing.files[split], images, labels, strict=True):
            assert CLASSES[label] == os.path.basename(os.path.dirname(path))
            expected = written[path].astype(int)
            if path.endswith(".png"):
                np.testing.assert_array_equal(image, expected)
            else:  # JPEG is lossy: close, not equal.
                assert np.abs(image.astype(int) - expected).mean() < 6, path
    # The training split is in a fixed shuffle (validation_examples takes its end),
    # the same for every load; the test split keeps the folders' order.
    assert sorted(listing.files["train"]) != listing.files["train"]
    assert listing.files["test"] == sorted(listing.files["test"])
    again = input_pipeline.load_dataset(f"folder:{root}", image_size=(8, 8), image_channels=1)
    np.testing.assert_array_equal(again.train.images, data.train.images)


def test_pictures_convert_to_the_configured_channels_and_size(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
    save(str(tmp_path / "gray.png"), gray)
    rgb = pictures.read_picture(str(tmp_path / "gray.png"), 3)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))  # L -> RGB copies.
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 255  # Pure red: ITU-R 601 luma 0.299 * 255 = 76.2.
    save(str(tmp_path / "red.png"), colour)
    assert np.all(pictures.read_picture(str(tmp_path / "red.png"), 1) == 76)
    flat = np.full((30, 20, 3), 131, np.uint8)
    save(str(tmp_path / "flat.png"), flat)
    resized = pictures.read_picture(str(tmp_path / "flat.png"), 3, (8, 16))
    assert resized.shape == (8, 16, 3) and np.all(resized == 131)  # A flat picture stays flat.
    big = np.random.default_rng(0).integers(0, 256, (24, 20, 1), dtype=np.uint8)
    save(str(tmp_path / "big.png"), big)
    shrunk = pictures.read_picture(str(tmp_path / "big.png"), 1, (6, 5))
    expected = triangle_resize(triangle_resize(big[..., 0].astype(float), 6, 0), 5, 1)
    assert np.abs(shrunk[..., 0] - expected).max() <= 1  # Pillow rounds between its passes.


def triangle_resize(x, size, axis):
    """Bilinear resampling along ``axis`` as an antialiasing resizer shrinks: a
    triangle filter stretched by the scale, each output pixel's weights summing to 1."""
    x = np.moveaxis(x, axis, 0)
    scale = len(x) / size
    out = []
    for i in range(size):
        centre = (i + 0.5) * scale
        j = np.arange(len(x))
        weights = np.maximum(0.0, 1 - np.abs((j + 0.5 - centre) / max(scale, 1.0)))
        out.append(np.tensordot(weights / weights.sum(), x, axes=1))
    return np.moveaxis(np.array(out), 0, axis)


def test_a_single_folder_holds_out_its_test_pictures_by_a_fixed_shuffle(tmp_path):
    written = write_folder(str(tmp_path / "one"), {"": 10}, splits=("",))
    listing = folders.list_pictures(f"folder:{tmp_path / 'one'}", held_out=6)
    assert len(listing.files["test"]) == 6 and len(listing.files["train"]) == 24
    assert sorted(listing.files["train"] + listing.files["test"]) == sorted(written)
    assert listing.files == folders.list_pictures(f"folder:{tmp_path / 'one'}", 6).files
    with pytest.raises(folders.FolderError, match="validation_examples=N"):
        folders.list_pictures(f"folder:{tmp_path / 'one'}", held_out=0)
    with pytest.raises(folders.FolderError, match="too few"):
        folders.list_pictures(f"folder:{tmp_path / 'one'}", held_out=15)


def test_a_class_folder_s_subfolders_are_read_too(tmp_path):
    written = write_folder(str(tmp_path / "flat"), {"train": 4, "test": 1})
    nested = tmp_path / "nested"
    for path in written:  # Half of each class's pictures one folder down.
        relative = os.path.relpath(path, tmp_path / "flat")
        split, name, file = relative.split(os.sep)
        where = nested / split / name / ("sub" if int(file[:3]) % 2 else "")
        os.makedirs(where, exist_ok=True)
        os.link(path, where / file)
    os.symlink(nested / "train" / "nut", nested / "train" / "nut" / "loop")  # Not followed.
    listing = folders.list_pictures(f"folder:{nested}", held_out=0)
    assert len(listing.files["train"]) == 4 * len(CLASSES)
    assert sorted(map(os.path.basename, listing.files["train"])) == sorted(
        os.path.basename(p) for p in written if f"{os.sep}train{os.sep}" in p
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("unreadable", "train/nut/bad.png: cannot read it as an image"),
        ("no test", "has train/ but no test/ folder"),
        ("one class", "has 1 class folder; a dataset needs one folder per class"),
        ("unknown test class", "has class folders that train/ lacks: screw"),
        ("missing", "is not a directory"),
        ("fifo", "train/nut/x.png: not a regular file"),
        ("empty class", "train/washer holds no pictures"),
    ],
)  # fmt: skip
def test_a_bad_folder_is_one_error_line_and_no_run_is_written(tmp_path, damage, message):
    root = tmp_path / "pictures"
    write_folder(str(root), {"train": 2, "test": 1})
    if damage == "unreadable":
        (root / "train" / "nut" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif damage == "no test":
        os.rename(root / "test", tmp_path / "elsewhere")
    elif damage == "one class":
        for split in ("train", "test"):
            for name in CLASSES[1:]:
                os.rename(root / split / name, tmp_path / f"{split}-{name}")
    elif damage == "unknown test class":
        os.makedirs(root / "test" / "screw")
    elif damage == "missing":
        root = tmp_path / "nowhere"
    elif damage == "fifo":  # Opened, it would block the run for ever.
        os.mkfifo(root / "train" / "nut" / "x.png")
    elif damage == "empty class":
        for picture_file in (root / "train" / "washer").iterdir():
            picture_file.unlink()
    result = train(f"--config.dataset=folder:{root}", "--workdir", str(tmp_path / "run"))
    assert result.returncode == 1 and len(errors_of(result)) == 1, result.stderr[-3000:]
    assert message in errors_of(result)[0], errors_of(result)[0]
    assert "Traceback" not in result.stderr
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    root, _ = folder
    workdir = tmp_path_factory.mktemp("folders") / "run"
    result = train(f"--config.dataset=folder:{root}", "--config.image_size=8,8",
                   "--workdir", str(workdir))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_train_export_predict_names_the_class_folders(folder, trained, tmp_path):
    root, _ = folder
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_count"] == 18 and record["test_accuracy"] >= 0.9, record
    data = json.loads((trained / "data.json").read_text())
    assert data["class_names"] == list(CLASSES) and data["image_shape"] == [8, 8, 1]
    result = module("export", "--workdir", trained)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [tmp_path / f"new_{name}.png" for name in CLASSES]
    rng = np.random.default_rng(7)
    for label, path in enumerate(new):  # New pictures, four times the size: resized.
        save(str(path), np.repeat(np.repeat(picture(label, rng, (8, 8), 1), 4, 0), 4, 1))
    result = module("predict", "--workdir", trained, *new)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = [line.split("\t")[1] for line in result.stdout.splitlines()]
    assert predicted == list(CLASSES)


def test_grain_streams_the_folders_records_bit_for_bit_as_the_memory_run(folder, trained, tmp_path):
    root, _ = folder
    records = tmp_path / "records"
    result = module("array_records", f"--dataset=folder:{root}", "--image_size=8,8",
                    f"--out_dir={records}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((records / "dataset.json").read_text())["class_names"] == list(CLASSES)
    workdir = tmp_path / "run"
    result = train(f"--config.dataset=folder:{root}", "--config.input_pipeline=grain",
                   f"--config.array_record_dir={records}", "--config.image_size=8,8",
                   "--workdir", str(workdir))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "metrics.jsonl").read_text() != ""
    for a, b in zip(
        jax_leaves(final_params(workdir)), jax_leaves(final_params(trained)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert json.loads((workdir / "data.json").read_text())["class_names"] == list(CLASSES)
    # Records of another size than the config's are refused, naming both.
    result = train(f"--config.dataset=folder:{root}", "--config.input_pipeline=grain",
                   f"--config.array_record_dir={records}", "--config.image_size=8,8",
                   "--config.image_channels=3",
                   "--workdir", str(tmp_path / "other"))  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "holds 8x8x1 pictures" in errors_of(result)[0] and "8x8x3" in errors_of(result)[0]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_rgb_pictures_of_another_size_train_a_small_cnn_from_a_single_folder(tmp_path):
    root = tmp_path / "photos"
    write_folder(str(root), {"": 40}, size=(40, 36), channels=3, splits=("",))
    workdir = tmp_path / "run"
    result = train(f"--config.dataset=folder:{root}", "--config.image_size=32,32",
                   "--config.image_channels=3", "--config.validation_examples=12",
                   "--config.model.conv_features=4,8", "--config.model.dense_features=16",
                   "--workdir", str(workdir))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "96 train / 12 validation / 12 test images of 32x32x3" in result.stderr
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_accuracy"] >= 0.9 and record["validation_accuracy"] >= 0.9, record
    data = json.loads((workdir / "data.json").read_text())
    assert data["image_shape"] == [32, 32, 3] and data["resize_pictures"] is True
    assert module("export", "--workdir", workdir).returncode == 0
    photo = tmp_path / "photo.jpg"
    save(str(photo), picture(2, np.random.default_rng(3), (50, 45), 3))
    result = module("predict", "--workdir", workdir, photo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\t")[1] == "washer"


def test_a_resume_on_pictures_added_or_removed_is_refused_in_one_line(tmp_path):
    root = tmp_path / "pictures"
    written = write_folder(str(root), {"train": 4, "test": 1})
    flags = (f"--config.dataset=folder:{root}", "--workdir", str(tmp_path / "run"))
    assert train(*flags).returncode == 0
    scores = (tmp_path / "run" / "metrics.jsonl").read_text()
    extra = root / "train" / "nut" / "extra.png"
    save(str(extra), next(iter(written.values())))
    for change in ("added", "removed"):
        if change == "removed":
            extra.unlink()
            os.remove(next(p for p in written if f"{os.sep}train{os.sep}" in p))
        result = train(*flags)
        assert result.returncode == 1 and len(errors_of(result)) == 1, result.stderr[-3000:]
        assert "holds a run on other pictures" in errors_of(result)[0], errors_of(result)[0]
        assert (tmp_path / "run" / "metrics.jsonl").read_text() == scores  # Nothing rewritten.
