"""The grain input pipeline: ArrayRecord files, training equal to the memory pipeline's."""

import functools
import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from helpers import AS_ROOT, final_params, idx_config, tmpfs, write_idx_dataset

from cnnflat_jax.data import array_records, input_pipeline
from cnnflat_jax.run import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_records(idx_dir, out_dir, *flags):
    return subprocess.run(
        [sys.executable, "-m", "cnnflat_jax.array_records", "--dataset", "toy",
         "--num_classes", "3", "--idx_dir", str(idx_dir), "--out_dir", str(out_dir), *flags],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip


def idx_arrays(idx_dir, prefix):
    """An IDX split read with gzip and numpy alone: the header is 16 (images) or 8 bytes."""
    arrays = []
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):
        path = os.path.join(idx_dir, f"{prefix}-{kind}-ubyte")
        gzipped = os.path.exists(path + ".gz")
        with gzip.open(path + ".gz") if gzipped else open(path, "rb") as f:
            arrays.append(np.frombuffer(f.read()[header:], np.uint8))
    return arrays[0].reshape(len(arrays[1]), 8, 8, 1), arrays[1].astype(np.int32)


def raw_records(path):
    """Every record of an ArrayRecord file, read with array_record's own reader."""
    reader = array_record_module.ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("grain")
    idx_dir = write_idx_dataset(root / "idx")
    result = write_records(idx_dir, root / "records")
    assert result.returncode == 0, result.stderr[-2000:]
    return idx_dir, root / "records", result


def test_the_command_writes_each_idx_example_as_a_label_then_its_pixels(dataset):
    idx_dir, records, result = dataset
    assert "wrote" in result.stdout and "64 train and 37 test records" in result.stdout
    info = json.loads((records / "dataset.json").read_text())
    assert info["dataset"] == "toy" and info["num_classes"] == 3
    assert info["image_shape"] == [8, 8, 1] and info["splits"] == {"train": 64, "test": 37}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = idx_arrays(idx_dir, prefix)
        rows = raw_records(records / f"{split}.array_record")
        assert len(rows) == len(labels)
        for record, image, label in zip(rows, images, labels):
            assert int.from_bytes(record[:4], "little") == label
            assert record[4:] == image.tobytes()


def test_records_read_any_shape_of_positions(dataset):
    idx_dir, records, _ = dataset
    data = input_pipeline.load_records("toy", array_record_dir=str(records))
    images, labels = idx_arrays(idx_dir, "train")
    positions = np.array([[5, 0, 63], [7, 7, 1]])
    got_images, got_labels = data.train.read(positions)
    assert got_images.shape == (2, 3, 8, 8, 1) and got_labels.shape == (2, 3)
    np.testing.assert_array_equal(got_images, images[positions])
    np.testing.assert_array_equal(got_labels, labels[positions])
    subset = data.train.take(np.array([9, 4]))
    np.testing.assert_array_equal(subset.read()[1], labels[[9, 4]])
    test_images, test_labels = idx_arrays(idx_dir, "t10k")  # The test split is in memory.
    np.testing.assert_array_equal(data.test_images, test_images)
    np.testing.assert_array_equal(data.test_labels, test_labels)
    assert (
        isinstance(data.train, array_records.Records)
        and data.train_total == 64
        and data.image_shape == (8, 8, 1)
    )


def test_repeat_writes_the_training_set_k_times_over(dataset, tmp_path):
    idx_dir, records, _ = dataset
    result = write_records(idx_dir, tmp_path / "x3", "--repeat", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    once = raw_records(records / "train.array_record")
    assert raw_records(tmp_path / "x3" / "train.array_record") == once * 3
    assert len(raw_records(tmp_path / "x3" / "test.array_record")) == 37


def test_an_existing_directory_is_refused_and_left_as_it_was(dataset, tmp_path):
    idx_dir, _, _ = dataset
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    result = write_records(idx_dir, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists and is not an empty directory" in result.stderr
    assert os.listdir(tmp_path / "out") == ["notes.txt"]


@AS_ROOT
def test_a_full_disk_is_one_error_line_and_leaves_no_partial_dataset(dataset, tmp_path):
    idx_dir, _, _ = dataset
    with tmpfs(tmp_path / "disk", "8k") as disk:
        result = write_records(idx_dir, disk / "records")
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: could not write") and "No space left on device" in last
        assert "Traceback" not in result.stderr
        assert os.listdir(disk) == []


def metrics(workdir):
    timing = {"images_per_sec", "epoch_sec", "elapsed_sec"}
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"validation_examples": 8, "num_train_examples": 60, "permute_pixels": True}],
)
def test_grain_training_equals_the_memory_pipeline_bit_for_bit(dataset, tmp_path, overrides):
    idx_dir, records, _ = dataset
    overrides = {"steps_per_dispatch": 1, **overrides}
    for pipeline in ("memory", "grain"):
        config = idx_config(idx_dir, input_pipeline=pipeline, array_record_dir=str(records))
        config.dataset = "toy"
        config.update(overrides)
        trainer.train_and_evaluate(config, str(tmp_path / pipeline))
    assert metrics(tmp_path / "grain") == metrics(tmp_path / "memory")
    for a, b in zip(
        jax.tree.leaves(final_params(tmp_path / "grain")),
        jax.tree.leaves(final_params(tmp_path / "memory")),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_process_opens_only_its_own_shard(dataset):
    idx_dir, records, _ = dataset
    part = input_pipeline.Part(num_train=60, shard_count=4, shards=range(2, 4))  # 2 of 4 shards.
    data = input_pipeline.load_records("toy", array_record_dir=str(records), part=part)
    np.testing.assert_array_equal(data.train.ids, np.arange(30, 60))
    assert data.train_total == 60
    images, _ = idx_arrays(idx_dir, "train")
    np.testing.assert_array_equal(data.train.read()[0], images[30:60])


def test_a_corrupt_record_file_names_the_file_and_the_records(dataset, tmp_path):
    _, records, _ = dataset
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in os.listdir(records):
        (damaged / name).write_bytes((records / name).read_bytes())
    path = damaged / "train.array_record"
    raw = bytearray(path.read_bytes())
    raw[1000:1200] = bytes(200)  # Zeros over some records (the file ends in padding).
    path.write_bytes(bytes(raw))
    data = input_pipeline.load_records("toy", array_record_dir=str(damaged))
    with pytest.raises(array_records.RecordError, match=f"{path}: cannot read records"):
        data.train.read()
    path.write_bytes(bytes(raw[:3000]))  # Truncated: the file cannot be opened.
    with pytest.raises(array_records.RecordError, match="is not a readable ArrayRecord file"):
        input_pipeline.load_records("toy", array_record_dir=str(damaged))


def test_a_record_of_another_size_or_class_is_named(dataset, tmp_path):
    _, records, _ = dataset
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text((records / "dataset.json").read_text())
    (bad / "test.array_record").write_bytes((records / "test.array_record").read_bytes())
    rows = raw_records(records / "train.array_record")
    rows[5] = rows[5][:-1]  # One pixel short.
    rows[9] = (7).to_bytes(4, "little") + rows[9][4:]  # Class 7 of 3.
    writer = array_record_module.ArrayRecordWriter(str(bad / "train.array_record"), "group_size:1")
    for row in rows:
        writer.write(row)
    writer.close()
    data = input_pipeline.load_records("toy", array_record_dir=str(bad))
    with pytest.raises(array_records.RecordError, match="record 5 has 67 bytes, not 68"):
        data.train.read(np.arange(8))
    with pytest.raises(array_records.RecordError, match=r"label 7 at record 9 is outside the 3"):
        data.train.read(np.arange(8, 12))


@pytest.mark.parametrize(
    "setup, message",
    [
        ("none", "no dataset.json: not a directory written by python -m cnnflat_jax.array_records"),
        ("other", "holds 'toy', not 'fashion_mnist'"),
    ],
)
def test_train_py_names_a_missing_or_wrong_record_directory(dataset, tmp_path, setup, message):
    records = dataset[1] if setup == "other" else tmp_path
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py",
         "--config.input_pipeline=grain", f"--config.array_record_dir={records}",
         "--workdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@functools.cache
def tfds_toy_builder():
    """A TFDS builder, ``toy_digits``, of the IDX toy dataset (defined once: TFDS registers it)."""
    import tensorflow_datasets as tfds
    from etils import epath

    class ToyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(os.path.dirname(__file__))  # No checksums or metadata files.
        MANUAL_DOWNLOAD_INSTRUCTIONS = "A directory of the toy IDX files."

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(features), disable_shuffling=True
            )

        def _split_generators(self, dl_manager):
            idx_dir = dl_manager.manual_dir
            return {
                "train": self._generate_examples(idx_dir, "train"),
                "test": self._generate_examples(idx_dir, "t10k"),
            }

        def _generate_examples(self, idx_dir, prefix):
            images, labels = idx_arrays(idx_dir, prefix)
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"image": image, "label": int(label)}

    return ToyDigits


def prepare_tfds_toy(data_dir, file_format, idx_dir):
    """Prepares the IDX toy dataset with TFDS in ``data_dir``, as ``file_format`` files."""
    import tensorflow_datasets as tfds

    builder = tfds_toy_builder()(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(idx_dir))
    )


def test_tfds_array_record_data_source_streams_the_training_split(dataset, tmp_path):
    idx_dir, _, _ = dataset
    prepare_tfds_toy(tmp_path, "array_record", idx_dir)
    data = input_pipeline.load_records("toy_digits", data_dir=str(tmp_path))
    images, labels = idx_arrays(idx_dir, "train")
    got_images, got_labels = data.train.read(np.array([3, 11, 63]))
    np.testing.assert_array_equal(got_images, images[[3, 11, 63]])
    np.testing.assert_array_equal(got_labels, labels[[3, 11, 63]])
    np.testing.assert_array_equal(data.test_labels, idx_arrays(idx_dir, "t10k")[1])
    assert data.train_total == 64 and data.num_classes == 3 and "ArrayRecord" in data.source


def test_a_tfds_copy_without_random_access_says_how_to_make_records(dataset, tmp_path):
    prepare_tfds_toy(tmp_path, "tfrecord", dataset[0])
    with pytest.raises(input_pipeline.DatasetError, match="is prepared as tfrecord, which has no"):
        input_pipeline.load_records("toy_digits", data_dir=str(tmp_path))


def test_without_a_prepared_tfds_copy_the_error_says_how_to_make_records(tmp_path):
    with pytest.raises(input_pipeline.DatasetError) as e:
        input_pipeline.load_records("fashion_mnist", data_dir=str(tmp_path / "tfds"))
    assert "python -m cnnflat_jax.array_records --dataset fashion_mnist" in str(e.value)
    assert "tfds build fashion_mnist --file_format=array_record" in str(e.value)
    assert not (tmp_path / "tfds").exists()
