"""The config schema: every field checked when a run starts, one error line each."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import idx_config, write_idx_dataset

from cnnflat_jax import config as config_lib
from cnnflat_jax.configs import cifar10, default, fast, mnist, pytorch_net, sequential, smoke, tpu
from cnnflat_jax.configs import population as population_config
from cnnflat_jax.nn import models
from cnnflat_jax.train import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [default, fast, mnist, cifar10, population_config, smoke, tpu, sequential, pytorch_net]

# One bad value per field, as a user would type it, and what the error must say.
BAD_VALUES = {
    "dataset": ("folder:/etc/hostname", "/etc/hostname is not a directory"),
    "data_source": ("web", "not a known choice; allowed: auto, tfds, idx"),
    "data_dir": ("/etc/hostname", "a file, not a directory"),
    "idx_dir": ("/etc/hostname", "a file, not a directory"),
    "num_classes": ("1", "one class is no classification"),
    "num_train_examples": ("-5", "less than 0; allowed: an int >= 0"),
    "num_test_examples": ("-1", "less than 0"),
    "validation_examples": ("-1", "less than 0"),
    "image_channels": ("2", "not 1 or 3; allowed: 1 or 3"),
    "image_size": ("(28,28,3)", "not two items; allowed: a pair (height, width) of ints >= 1"),
    "permute_pixels": ("maybe", "allowed: True or False"),
    "input_pipeline": ("disk", "not a known choice; allowed: memory, grain"),
    "array_record_dir": ("/etc/hostname", "a file, not a directory"),
    "augment_shift": ("-2", "less than 0; allowed: an int >= 0"),
    "model.name": ("resnet", "not a known choice; allowed: cnn, mlp"),
    "model.conv_features": ("(0,16)", "item 0 (0) is less than 1"),
    "model.kernel_size": ("0", "less than 1; allowed: an int >= 1"),
    "model.padding": ("FULL", "allowed: SAME, VALID"),
    "model.pool": ("min", "allowed: max, avg, stride"),
    "model.pool_window": ("0", "less than 1"),
    "model.dense_features": ("(-3,)", "item 0 (-3) is less than 1"),
    "model.permute_flat": ("maybe", "allowed: True or False"),
    "model.conv_lowering": ("fft", "allowed: auto, lax, nhwc_grads, im2col, hybrid"),
    "optimizer": ("lamb", "allowed: sgd, adam, adamw"),
    "learning_rate": ("nan", "not finite; allowed: a finite number > 0"),
    "momentum": ("1.5", "allowed: a finite number in [0, 1)"),
    "weight_decay": ("-1", "less than 0"),
    "schedule": ("linear", "allowed: constant, warmup_cosine"),
    "warmup_epochs": ("-1", "less than 0"),
    "batch_size": ("0", "less than 1"),
    "compute_dtype": ("float16", "not a known choice; allowed: float32, bfloat16"),
    "eval_batch_size": ("0", "less than 1"),
    "num_epochs": ("0", "less than 1"),
    "seed": (str(2**64), "greater than"),
    "num_devices": ("99", "only 1 device(s) exist"),
    "data_shards": ("-1", "less than 0"),
    "checkpoint_every_steps": ("0", "less than 1"),
    "checkpoints_to_keep": ("0", "less than 1"),
    "workdir_lease_sec": ("1", "less than 2"),
    "peer_timeout_sec": ("1", "less than 2"),
    "loop": ("python", "allowed: compiled, per_step"),
    "steps_per_dispatch": ("0", "less than 1"),
    "progress_bar": ("maybe", "allowed: True or False"),
    "compilation_cache": ("maybe", "allowed: True or False"),
    "stop_at_test_accuracy": ("2", "greater than 1; allowed: a finite number in [0, 1]"),
    "max_loss": ("-1", "less than 0"),
    "population.size": ("0", "less than 1"),
    "population.seeds": ("(1,2)", "2 values for population.size=1"),
    "population.learning_rates": ("(-0.1,)", "item 0 (-0.1) is not greater than 0"),
    "population.weight_decays": ("(-1.0,)", "item 0 (-1.0) is less than 0"),
    "population.momenta": ("(1.0,)", "item 0 (1.0) is not less than 1"),
    "population.independent_data_order": ("maybe", "allowed: True or False"),
    "per_example.clip_norm": ("-1", "less than 0"),
    "per_example.noise_multiplier": ("-1", "less than 0"),
    "per_example.report_hardest": ("-1", "less than 0"),
    "per_example.report_scan_examples": ("0", "less than 1"),
}


def test_the_bad_values_cover_every_field_of_the_default_config_and_the_model():
    fields = set(config_lib.default_fields())
    model_fields = {f"model.{key}" for key in default.get_config().model}
    assert set(BAD_VALUES) == fields | model_fields
    assert set(config_lib.FIELDS) == {f for f in fields if not f.startswith("model.")}
    takes = {f for cls in models.MODELS.values() for f in cls.__dataclass_fields__}
    assert set(config_lib.MODEL_FIELDS) == takes - {"parent", "num_classes"}


def run_train(*flags, workdir):
    command = [sys.executable, "train.py", "--config", "configs/smoke.py", *flags]
    return subprocess.Popen(
        [*command, "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def assert_one_error_line(process, expected):
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], lines[0]


def test_train_py_refuses_every_field_s_bad_value_in_one_line_before_any_work(tmp_path):
    fields = list(BAD_VALUES)
    for batch in range(0, len(fields), 8):  # 8 processes at a time: memory for all of them.
        processes = {}
        for field in fields[batch : batch + 8]:
            value = BAD_VALUES[field][0]
            processes[field] = run_train(f"--config.{field}={value}", workdir=tmp_path / field)
        for field, process in processes.items():
            value, why = BAD_VALUES[field]
            shown = value if field != "seed" else str(2**64)
            assert_one_error_line(process, [f"config.{field}={shown}", why])
            assert not (tmp_path / field).exists()  # Nothing was written.


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--config.lerning_rate=0.1"], ["config.lerning_rate=0.1: unknown field", "did you"]),
        (["--config.model.conv_lowerng=x"], ["config.model.conv_lowerng=x: unknown field"]),
        (["--config=configs/missing.py"], ["config file configs/missing.py", "No such file"]),
        (["--config.batch_size=abc"], ["config.batch_size=abc:", "allowed: an int >= 1"]),
        (["--config.population.size=3", "--config.population.seeds=(1,1,2)"],
         ["config.population.seeds=(1,1,2): a seed repeats"]),
        (["--config.batch_size=100", "--config.data_shards=3"],
         ["config.batch_size=100: does not split over", "allowed: a multiple of 3"]),
        (["unexpected"], ["unexpected arguments: unexpected"]),
    ],
)  # fmt: skip
def test_train_py_reports_config_mistakes_in_one_line(tmp_path, flags, expected):
    assert_one_error_line(run_train(*flags, workdir=tmp_path / "run"), expected)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_fails_to_run_is_one_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(:\n")
    expected = [f"config file {path}: SyntaxError"]
    assert_one_error_line(run_train(f"--config={path}", workdir=tmp_path / "run"), expected)
    # An argument the config's get_config does not take: absl quotes the traceback.
    expected = ["config file ", "smoke.py:foo: TypeError: get_config() takes 0 positional"]
    assert_one_error_line(run_train("--config=smoke:foo", workdir=tmp_path / "run"), expected)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"model.kernel_size": 16}, "config.model.kernel_size=16: too large for the 8x8 map"),
        ({"model.padding": "VALID", "model.kernel_size": 9},
         "config.model.kernel_size=9: too large for the 8x8 map of conv layer 0 (VALID"),
        ({"model.pool_window": 9}, "config.model.pool_window=9: larger than the 8x8 map"),
        ({"model.padding": "VALID", "model.kernel_size": 3},
         "config.model.pool_window=2: larger than the 1x1 map after conv layer 1"),
        ({"model.padding": "VALID", "model.kernel_size": 2, "model.pool_window": 4},
         "config.model.kernel_size=2: too large for the 1x1 map"),
        ({"validation_examples": 64}, "config.validation_examples=64: leaves no training"),
        ({"augment_shift": 8},
         "config.augment_shift=8: would move 8x8x1 images wholly off their canvas; allowed: "
         "0 to 7"),
    ],
)  # fmt: skip
def test_limits_set_by_the_data_are_checked_before_compiling(tmp_path, overrides, expected):
    data = write_idx_dataset(tmp_path / "data")  # 64 train images of 8x8.
    config = idx_config(data)
    for key, value in overrides.items():
        group, _, field = key.rpartition(".")
        (config[group] if group else config)[field] = value
    config_lib.check(config)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_data(config, (8, 8, 1), 64)
    assert str(error.value).startswith(expected)


@pytest.mark.parametrize("module", SHIPPED)
def test_every_shipped_config_is_valid_on_one_device(module):
    config = module.get_config()
    config.num_devices = 1  # The suite's process has 8 fake CPU devices.
    config_lib.check(config)


@pytest.mark.parametrize("module", SHIPPED)
def test_one_epoch_of_every_shipped_config_warms_up_then_decays(module):
    config = module.get_config()
    config.num_epochs, config.num_devices = 1, 1
    config_lib.check(config)
    make_tx = train_lib.optimizer_factory(config, steps_per_epoch=100)
    hparams = {"learning_rate": 1.0, "weight_decay": 0.0, "momentum": 0.9}
    params = {"w": np.zeros(())}
    tx = make_tx(**hparams)
    state = tx.init(params)
    rates = []
    for _ in range(100):  # Adam's update of a constant gradient follows the schedule.
        updates, state = tx.update({"w": np.ones(())}, state, params)
        rates.append(abs(float(updates["w"])))
    assert config.schedule == "warmup_cosine"
    if config.warmup_epochs > 0:
        assert rates[0] == 0.0  # The warmup starts at 0 ...
        assert 0 < int(np.argmax(rates)) <= 50  # ... and peaks within the first half ...
    assert rates[-1] < 0.01 * max(rates)  # ... then the cosine decays to ~0.


def test_default_config_with_one_epoch_trains(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    flags = ["--config", "configs/default.py", "--config.data_source=idx",
             f"--config.idx_dir={data}", "--config.num_epochs=1", "--config.batch_size=16",
             "--config.eval_batch_size=37", "--config.progress_bar=False",
             "--workdir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warming up for 2 of the 4 steps instead" in result.stderr
    assert "Done: 1 epochs" in result.stderr


def test_the_error_names_the_field_its_value_the_fault_and_what_is_allowed():
    config = smoke.get_config()
    config.model.conv_features = (8, 0)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check(config)
    assert str(error.value) == (
        "config.model.conv_features=(8,0): item 1 (0) is less than 1; "
        "allowed: a non-empty tuple of items each an int >= 1"
    )
    config = smoke.get_config()
    config.model.name = "mlp"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.conv_features=\(8,16\): not"):
        config_lib.check(config)  # The MLP takes no conv layers.
    assert jax.device_count() == 8  # conftest's fake devices: the device rules see 8.


def test_the_docs_list_exactly_the_free_fields_of_the_schema():
    with open(os.path.join(ROOT, "docs", "guide", "reliability.md")) as f:
        row = next(line for line in f if "Only fields that change how a run is watched" in line)
    listed = row.split("may differ:")[1].split("(")[0]
    readme = set(re.findall(r"`([\w.]+)`", listed))
    assert readme == {k for k, field in config_lib.FIELDS.items() if not field.identity}
    assert {"data_dir", "idx_dir", "array_record_dir"} <= {
        k for k, field in config_lib.FIELDS.items() if field.identity
    }


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--config.batch_size=10000000"],
         ["config.batch_size=10000000: the run needs at least", "GiB of memory here"]),
        (["--config.eval_batch_size=10000000"],
         ["config.eval_batch_size=10000000: the run needs at least"]),
        (["--config.model.conv_features=(100000000,)"],
         ["config.model=cnn of", "parameters: the run needs at least", "allowed: smaller layers"]),
        (["--config.idx_dir=/no/such/idx"], ["config.idx_dir=/no/such/idx: no such directory"]),
        (["--config.learning_rate=1e308"], ["the training loss became"]),
    ],
)  # fmt: skip
def test_resources_are_bounded_before_they_are_spent(tmp_path, flags, expected):
    # Checked once the data is loaded (its image shape sets the sizes): log lines come first.
    _, stderr = run_train(*flags, workdir=tmp_path / "run").communicate(timeout=300)
    assert "Traceback" not in stderr and "Compiled" not in stderr or "loss" in expected[0]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert all(part in line for part in expected), line
    assert not list((tmp_path / "run").glob("checkpoints/*/state"))  # No work was saved.


def test_a_huge_warmup_is_capped_not_overflowed(tmp_path):
    process = run_train("--config.warmup_epochs=1e308", workdir=tmp_path / "run")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "warmup_epochs=1e+308 is more than half of the 1 epoch(s)" in stderr


def test_a_workdir_path_too_long_for_the_checkpoints_is_refused_before_any_work(tmp_path):
    workdir = tmp_path.joinpath(*["x" * 200] * 20)
    assert_one_error_line(run_train(workdir=workdir), ["characters", "use a shorter --workdir"])
    assert not (tmp_path / ("x" * 200)).exists()
