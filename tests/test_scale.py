"""Data parallelism over fake CPU devices and over two local processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import final_params, idx_config, idx_flags, write_idx_dataset

from cnnflat_jax import config as config_lib
from cnnflat_jax.data import array_records, input_pipeline
from cnnflat_jax.run import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def assert_close_params(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("loop", ["compiled", "per_step"])
def test_eight_devices_match_one_device_with_the_same_global_batch(tmp_path, loop):
    assert jax.device_count() == 8  # conftest's fake CPU devices
    data = write_idx_dataset(tmp_path / "data", num_train=70)
    for devices in (1, 8):
        config = idx_config(data, num_devices=devices, loop=loop, num_epochs=3)
        trainer.train_and_evaluate(config, str(tmp_path / f"d{devices}"))
    np.testing.assert_allclose(
        train_losses(tmp_path / "d8"), train_losses(tmp_path / "d1"), rtol=1e-5
    )
    assert_close_params(final_params(tmp_path / "d8"), final_params(tmp_path / "d1"))


def test_a_sharded_population_matches_one_device(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    for devices in (1, 8):
        config = idx_config(data, num_devices=devices)
        config.population.size = 2
        config.population.independent_data_order = True
        trainer.train_and_evaluate(config, str(tmp_path / f"d{devices}"))
    assert_close_params(
        final_params(tmp_path / "d8", members=2), final_params(tmp_path / "d1", members=2)
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=12), r"config.batch_size=12: does not split over the 8 device\(s\)"),
        (dict(eval_batch_size=10), r"config.eval_batch_size=10: does not split over the 8"),
        (
            dict(data_shards=3),
            r"config.batch_size=16: .* and 3 data shard\(s\); allowed: a multiple of 24",
        ),
        (dict(num_devices=16), r"config.num_devices=16: only 8 device\(s\) exist"),
        (
            dict(validation_examples=3, data_shards=2),
            r"config.validation_examples=3: does not split",
        ),
    ],
)
def test_batches_that_do_not_split_evenly_are_clear_errors(tmp_path, overrides, message):
    data = write_idx_dataset(tmp_path / "data")
    with pytest.raises(config_lib.ConfigError, match=message):
        trainer.train_and_evaluate(idx_config(data, **overrides), str(tmp_path / "run"))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(data, workdir, *flags, per_process=((), ()), overrides=None):
    """Two processes of one run (gloo over localhost), 2 CPU devices each, with
    ``flags``; ``per_process[i]`` are process i's own."""
    address = f"localhost:{free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *idx_flags(data, **(overrides or {})),
                "--workdir",
                str(workdir),
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                *flags,
                *per_process[i],
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


@pytest.mark.parametrize("pipeline", ["memory", "grain"])
def test_two_processes_match_one_process_with_the_same_data_shards(tmp_path, pipeline):
    data = write_idx_dataset(tmp_path / "data", num_train=70)
    overrides = dict(num_epochs=3, validation_examples=6)
    streamed = []
    if pipeline == "grain":  # Each process streams its own shard from the records.
        loaded = input_pipeline.load_dataset("fashion_mnist", idx_dir=str(data), num_classes=3)
        splits = {
            "train": (loaded.train.images, loaded.train.labels),
            "test": (loaded.test_images, loaded.test_labels),
        }
        array_records.write(str(tmp_path / "records"), "fashion_mnist", 3, splits)
        streamed = [
            "--config.input_pipeline=grain",
            f"--config.array_record_dir={tmp_path / 'records'}",
        ]
    workdir = tmp_path / "two"
    processes = start_two_processes(data, workdir, *streamed, overrides=overrides)
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "Process 0 of 2, 2 local of 4 devices" in outputs[0][1]
    assert "epoch 3/3" in outputs[0][1] and "epoch 3/3" not in outputs[1][1]  # Only 0 logs.
    # One process, 8 devices, the data order of two shards: the same batches.
    config = idx_config(data, data_shards=2, **overrides)
    trainer.train_and_evaluate(config, str(tmp_path / "one"))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["test_count"] == 37 and records[-1]["validation_count"] == 6
    np.testing.assert_allclose(train_losses(workdir), train_losses(tmp_path / "one"), rtol=1e-5)
    assert_close_params(final_params(workdir), final_params(tmp_path / "one"))


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--num_processes=2", "--process_id=2"], "--process_id=2: not one of the 2 processes"),
        (["--num_processes=-1", "--process_id=0"], "got --coordinator_address='localhost:1"),
        (["--num_processes=0", "--process_id=0"], "the process count (>= 1)"),
        (["--num_processes=2", "--process_id=0", "--coordinator_address=localhost"],
         "--coordinator_address=localhost: not HOST:PORT"),
    ],
)  # fmt: skip
def test_process_flags_that_cannot_start_a_run_are_one_error_line(tmp_path, flags, expected):
    data = write_idx_dataset(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "train.py", *idx_flags(data), "--workdir", str(tmp_path / "run"),
         "--coordinator_address=localhost:1", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in errors[0]
    assert not (tmp_path / "run").exists()


def test_processes_given_other_configs_all_refuse_before_any_step(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    processes = start_two_processes(
        data, tmp_path / "run", "--config.peer_timeout_sec=10",
        per_process=((), ("--config.learning_rate=0.01",)),
    )  # fmt: skip
    ends = [(process.communicate(timeout=300)[1], process.returncode) for process in processes]
    for err, returncode in ends:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert returncode == 1 and len(errors) == 1, err[-3000:]
        assert "process 1 differs from process 0 in learning_rate 0.002 -> 0.01" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
