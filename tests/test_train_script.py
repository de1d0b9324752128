"""End-to-end: `python train.py` as a user runs it, on real Fashion-MNIST, and what
its start-up imports (the fixed cost, held in place without timing anything)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import idx_bytes, write_idx_dataset

from cnnflat_jax.data import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.isdir(input_pipeline.DEBIAN_IDX_DIRS["fashion_mnist"])


def train(workdir, *flags, python=()):
    command = [sys.executable, *python, "train.py", "--config", "configs/smoke.py"]
    command += ["--workdir", str(workdir), *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def imported(importtime_stderr: str) -> set[str]:
    """The top-level packages that ``python -X importtime`` listed on stderr."""
    lines = [line for line in importtime_stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[2].strip().split(".")[0] for line in lines[1:]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``train.py --config configs/smoke.py`` for 2 epochs on the real data, under
    ``-X importtime``: ``(workdir, result)``."""
    if not REAL_DATA:
        pytest.skip("needs Debian's dataset-fashion-mnist (.ci/run installs it)")
    workdir = tmp_path_factory.mktemp("smoke")
    result = train(workdir, "--config.num_epochs=2", python=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_help_imports_no_jax_orbax_matplotlib_tensorflow_or_torch():
    command = [sys.executable, "-X", "importtime", "train.py", "--help"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "--workdir: Directory for metrics and params." in result.stdout
    packages = imported(result.stderr)
    assert {"absl", "ml_collections", "cnnflat_jax"} <= packages  # The listing was read.
    assert not packages & {"jax", "flax", "orbax", "matplotlib", "tensorflow", "torch"}


def test_a_smoke_run_imports_neither_tensorflow_nor_torch_nor_matplotlib(smoke_run):
    for package in ("tensorflow", "torch"):  # Installed here (the test extras), so importable.
        assert importlib.util.find_spec(package) is not None, package
    packages = imported(smoke_run[1].stderr)
    assert {"jax", "flax", "orbax", "PIL", "tensorboard"} <= packages  # The listing was read.
    assert not packages & {"tensorflow", "torch", "tensorboardX", "matplotlib"}


def test_smoke_run_on_real_fashion_mnist_writes_metrics_config_and_params(smoke_run):
    tmp_path, result = smoke_run
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in [
        "step",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "images_per_sec",
    ]:
        assert key in records[-1]
    assert records[-1]["step"] == 2 * 16  # 2000 images, batch 128: 15 full + 1 partial.
    assert records[-1]["test_count"] == 1000
    assert records[-1]["test_loss"] < records[0]["test_loss"]
    assert records[-1]["test_accuracy"] > 0.6  # 10 classes: chance is 0.1.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_epochs"] == 2 and config["dataset"] == "fashion_mnist"
    assert (tmp_path / "final_params").is_dir()
    assert "IDX files in /usr/share/datasets/fashion-mnist" in result.stderr
    assert "Compiled the compiled training loop" in result.stderr
    assert "Done: 2 epochs" in result.stderr


def test_unknown_config_override_fails_with_a_clear_message(tmp_path):
    result = train(tmp_path, "--config.lerning_rate=0.1")
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_fails_with_a_clear_message_and_writes_nothing(tmp_path):
    result = train(
        tmp_path / "run", "--config.data_source=idx", f"--config.idx_dir={tmp_path / 'none'}"
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: config.idx_dir={tmp_path / 'none'}: no such directory; "
        'allowed: an existing directory, or "" for the default\n'
    )  # Never a silent fallback to another copy of the data.
    assert not (tmp_path / "run").exists()


def test_invalid_config_value_fails_before_any_work(tmp_path):
    result = train(tmp_path, "--config.optimizer=lamb")
    assert result.returncode == 1
    assert "error: config.optimizer=lamb: not a known choice; allowed: sgd, adam, adamw" in (
        result.stderr
    )
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_population_from_the_command_line(tmp_path):
    data = write_idx_dataset(tmp_path / "data", num_train=64)
    result = train(
        tmp_path / "run",
        "--config.data_source=idx",
        f"--config.idx_dir={data}",
        "--config.population.size=3",
        "--config.population.learning_rates=(0.01,0.03,0.1)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["member"] for r in lines] == [0, 1, 2, "ensemble"]
    assert [r["learning_rate"] for r in lines[:3]] == [0.01, 0.03, 0.1]
    assert "Population summary:" in result.stderr


def one_error_line(result):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def idx_run(tmp_path, data, *flags):
    return train(tmp_path / "run", "--config.data_source=idx", f"--config.idx_dir={data}", *flags)


@pytest.mark.parametrize(
    "split_file,index,value",
    [("train-labels-idx1-ubyte", 7, 200), ("t10k-labels-idx1-ubyte", 3, 10)],
)
def test_a_label_outside_the_classes_stops_the_run_before_training(
    tmp_path, split_file, index, value
):
    data = write_idx_dataset(tmp_path / "data", num_train=20, num_test=7)
    for stale in (data / split_file, data / f"{split_file}.gz"):
        stale.unlink(missing_ok=True)
    labels = np.zeros(20 if split_file.startswith("train") else 7, np.uint8)
    labels[index] = value
    (data / split_file).write_bytes(idx_bytes(labels))
    line = one_error_line(idx_run(tmp_path, data))  # fashion_mnist: 10 classes.
    assert f"{data / split_file}: label {value} at index {index} is outside the 10 classes" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_and_test_images_of_different_sizes_are_one_error_line(tmp_path):
    data = write_idx_dataset(tmp_path / "data", num_train=20, num_test=7, size=8)
    (data / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 9, 9), np.uint8)))
    line = one_error_line(idx_run(tmp_path, data, "--config.num_classes=3"))
    assert "the train images" in line and "are 8x8x1 but the test images" in line
    assert "are 9x9x1" in line
