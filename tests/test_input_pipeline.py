"""IDX reading, data-source selection, error paths, TFDS, and the real data."""

import gzip
import os

import numpy as np
import pytest
from helpers import idx_bytes, write_idx_dataset

from cnnflat_jax.data import input_pipeline, tfds_source
from cnnflat_jax.data.idx import IdxError, read_idx

DEBIAN_DIR = input_pipeline.DEBIAN_IDX_DIRS["fashion_mnist"]


def test_read_idx_round_trips_raw_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    (tmp_path / "raw").write_bytes(idx_bytes(images))
    with gzip.open(tmp_path / "packed.gz", "wb") as f:
        f.write(idx_bytes(images))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw", ndim=3), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.gz", ndim=3), images)


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "short",
            idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3],
            r"truncated: header says shape \(4, 2, 2\)",
        ),
        ("long", idx_bytes(np.zeros((4, 2, 2), np.uint8)) + b"x", r"has trailing bytes"),
        ("magic", b"\x00\x00\x0d\x03" + bytes(12), r"bad magic number 0x00000d03"),
        ("dims", idx_bytes(np.zeros((4,), np.uint8)), r"has 1 dimensions, expected 3"),
        ("tiny", b"\x00\x00", r"too short for an IDX header"),
        ("header", b"\x00\x00\x08\x03" + bytes(5), r"truncated inside the header"),
        ("bad.gz", b"this is not gzip", r"bad.gz: not a readable gzip file"),
    ],
)
def test_read_idx_names_the_file_and_the_defect(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IdxError, match=message) as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_reported(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 10, 10)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxError, match=r"cut.gz: not a readable gzip file .* truncated"):
        read_idx(path, ndim=3)


def test_idx_directory_loads_shapes_and_labels_from_the_files(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20, num_test=7, size=6, num_classes=3)
    data = input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)
    assert data.train.images.shape == (20, 6, 6, 1) and data.train.images.dtype == np.uint8
    assert data.test_labels.shape == (7,) and data.test_labels.dtype == np.int32
    assert data.num_classes == 3
    assert data.image_shape == (6, 6, 1)
    assert data.source == f"IDX files in {directory}"
    assert (data.train_total, data.test_total) == (20, 7)


def test_a_part_loads_only_its_shards_of_the_first_examples(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20, num_test=7, size=6, num_classes=3)
    full = input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)
    # The first 17 train / 6 test examples, cut into 4 shards; shards 2 and 3 kept.
    part = input_pipeline.Part(num_train=17, num_test=6, shard_count=4, shards=range(2, 4))
    data = input_pipeline.load_dataset(
        "toy", source="idx", idx_dir=str(directory), part=part, num_classes=3
    )
    assert (data.train_total, data.test_total) == (17, 6)
    np.testing.assert_array_equal(data.train.images, full.train.images[8:17])  # 2*17//4 = 8
    np.testing.assert_array_equal(data.test_labels, full.test_labels[3:6])  # 2*6//4 = 3
    assert data.num_classes == 3


def test_mismatched_image_and_label_counts(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IdxError, match=r"3 labels for 37 images"):
        input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)


def test_missing_idx_file_is_named(tmp_path):
    directory = write_idx_dataset(tmp_path)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(IdxError, match=r"no train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz"):
        input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)


def test_nothing_loadable_gives_one_error_listing_attempts_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setitem(input_pipeline.DEBIAN_IDX_DIRS, "fashion_mnist", str(tmp_path / "debian"))

    def offline(name, data_dir, part, num_classes, *, download):
        raise tfds_source.NotAvailable(
            "download failed: no network" if download else "not prepared"
        )

    monkeypatch.setattr(tfds_source, "load", offline)
    with pytest.raises(input_pipeline.DatasetError) as info:
        input_pipeline.load_dataset("fashion_mnist", idx_dir=str(tmp_path / "mine"))
    message = str(info.value)
    for expected in [
        f"IDX files in {tmp_path / 'mine'}: no such directory",
        "(prepared copy): not prepared",
        f"IDX files in {tmp_path / 'debian'}: no such directory",
        "(download): download failed: no network",
        "apt-get install -y dataset-fashion-mnist",
        "--config.idx_dir",
    ]:
        assert expected in message


def test_auto_prefers_a_prepared_tfds_copy_then_local_idx(tmp_path, monkeypatch):
    directory = write_idx_dataset(tmp_path / "debian")
    monkeypatch.setitem(input_pipeline.DEBIAN_IDX_DIRS, "fashion_mnist", str(directory))
    calls = []

    def not_prepared(name, data_dir, part, num_classes, *, download):
        calls.append(download)
        raise tfds_source.NotAvailable("not prepared")

    monkeypatch.setattr(tfds_source, "load", not_prepared)
    data = input_pipeline.load_dataset("fashion_mnist")
    assert calls == [False]  # Looked for a prepared copy, never tried to download.
    assert data.source == f"IDX files in {directory}"


def test_failed_download_removes_what_it_wrote(tmp_path):
    data_dir = tmp_path / "tfds"
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "keep.txt").write_text("from an earlier run")
    watched = [str(data_dir), str(data_dir / "fake"), str(data_dir / "downloads")]
    with pytest.raises(ConnectionError):
        with tfds_source._removed_on_failure(watched):
            (data_dir / "downloads" / "part.tmp").write_bytes(b"half")
            os.makedirs(data_dir / "fake" / "1.0.0.incomplete")
            raise ConnectionError("network unreachable")
    assert sorted(os.listdir(data_dir)) == ["downloads"]
    assert os.listdir(data_dir / "downloads") == ["keep.txt"]


def test_a_fresh_data_dir_is_removed_whole_on_failure(tmp_path):
    data_dir = tmp_path / "new"
    with pytest.raises(OSError):
        with tfds_source._removed_on_failure([str(data_dir)]):
            (data_dir / "x").mkdir(parents=True)
            raise OSError("disk full")
    assert not data_dir.exists()


def test_looking_for_a_prepared_tfds_copy_writes_nothing(tmp_path):
    with pytest.raises(tfds_source.NotAvailable, match="not prepared"):
        tfds_source.load("mnist", str(tmp_path / "tfds"), input_pipeline.Part(), 0, download=False)
    assert not (tmp_path / "tfds").exists()


def write_labels(path, labels):
    path.write_bytes(idx_bytes(np.asarray(labels, np.uint8)))


def test_a_label_outside_the_classes_is_named_with_its_file_and_index(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20, num_test=7)
    labels = np.zeros(7, np.uint8)
    labels[4] = 10  # fashion_mnist has classes 0..9: the test split alone is wrong.
    write_labels(tmp_path / "t10k-labels-idx1-ubyte", labels)
    message = r"t10k-labels-idx1-ubyte: label 10 at index 4 is outside the 10 classes \[0, 10\)"
    with pytest.raises(IdxError, match=message):
        input_pipeline.load_dataset("fashion_mnist", source="idx", idx_dir=str(directory))
    # A declared count covers the labels it admits, and refuses the rest.
    data = input_pipeline.load_dataset(
        "fashion_mnist", source="idx", idx_dir=str(directory), num_classes=11
    )
    assert data.num_classes == 11
    with pytest.raises(IdxError, match=r"label 10 at index 4 is outside the 3 classes"):
        input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)


def test_the_class_count_never_comes_from_the_largest_label(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20, num_test=7, num_classes=3)
    data = input_pipeline.load_dataset("mnist", source="idx", idx_dir=str(directory))
    assert data.num_classes == 10  # MNIST's count, though only labels 0..2 occur.
    with pytest.raises(input_pipeline.DatasetError, match=r"set --config.num_classes"):
        input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory))


def test_train_and_test_images_of_different_sizes_are_one_error(tmp_path):
    directory = write_idx_dataset(tmp_path, num_train=20, num_test=7, size=6)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 5, 6), np.uint8)))
    message = r"the train images \(.*train-images-idx3-ubyte.gz\) are 6x6x1 but the test images"
    with pytest.raises(input_pipeline.DatasetError, match=message):
        input_pipeline.load_dataset("toy", source="idx", idx_dir=str(directory), num_classes=3)


def test_tfds_class_count_comes_from_its_metadata_and_must_agree(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        with pytest.raises(input_pipeline.DatasetError, match=r"TFDS cifar10 has 10 classes"):
            input_pipeline.load_dataset(
                "cifar10", source="tfds", data_dir=str(tmp_path), num_classes=5
            )


def test_a_name_not_in_the_tfds_catalog_is_one_line_naming_the_closest(tmp_path):
    with pytest.raises(input_pipeline.DatasetError) as error:
        input_pipeline.load_dataset("fashion_mnis", source="tfds", data_dir=str(tmp_path))
    assert str(error.value) == (
        "config.dataset=fashion_mnis: not in the TFDS catalog (did you mean fashion_mnist?); "
        "allowed: a TFDS catalog name or folder:PATH"
    )
    assert not any(tmp_path.iterdir())  # Nothing was written.


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match=r"unknown data source 'ftp'"):
        input_pipeline.load_dataset("mnist", source="ftp")


def test_tfds_source_reads_shapes_and_classes_from_dataset_info(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        data = input_pipeline.load_dataset("cifar10", source="tfds", data_dir=str(tmp_path))
    assert data.image_shape == (32, 32, 3)
    assert data.num_classes == 10
    assert data.train.images.shape == (12, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.source.startswith("TFDS cifar10")
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.skipif(
    not os.path.isdir(DEBIAN_DIR),
    reason="needs Debian's dataset-fashion-mnist package (.ci/run installs it)",
)
def test_real_fashion_mnist_from_the_debian_package():
    data = input_pipeline.load_dataset("fashion_mnist", source="idx")
    assert data.train.images.shape == (60000, 28, 28, 1)
    assert data.test_images.shape == (10000, 28, 28, 1)
    assert data.num_classes == 10
    # Published facts about Fashion-MNIST: balanced classes, mean pixel 0.2860.
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.train.images.mean() / 255 == pytest.approx(0.2860, abs=5e-4)
