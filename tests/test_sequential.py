"""Training any layer spec: dropout keyed by step, resume, populations, devices, train.py."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import idx_config, idx_flags, write_idx_dataset

from cnnflat_jax.data import idx
from cnnflat_jax.nn import models
from cnnflat_jax.run import checkpoints, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPOUT_NET = (
    "conv:8:3", "relu", "max_pool:2", "dropout:0.25", "conv:16:3", "relu", "global_avg_pool",
    "dense:32", "relu", "dropout:0.5", "dense:3",
)  # fmt: skip


def spec_config(data, layers=DROPOUT_NET, **overrides):
    config = idx_config(data, **overrides)
    config.model = ml_collections.ConfigDict(dict(name="sequential", layers=layers))
    return config


def params_of(workdir, layers=DROPOUT_NET, members=0):
    like = models.Sequential(layers).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    if members:
        like = jax.tree.map(lambda x: jnp.zeros((members, *x.shape), x.dtype), like)
    return checkpoints.load_params(os.path.join(workdir, "final_params"), like)


def records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "sec" not in k} for line in lines]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("data"), num_train=80)


def test_the_cnn_preset_and_its_spec_train_bit_identically(data, tmp_path):
    config = idx_config(data)
    trainer.train_and_evaluate(config, str(tmp_path / "cnn"))
    cnn = models.create_model("cnn", 3, **{k: v for k, v in config.model.items() if k != "name"})
    trainer.train_and_evaluate(spec_config(data, cnn.specs()), str(tmp_path / "spec"))
    assert records(tmp_path / "spec") == records(tmp_path / "cnn")
    assert_trees_equal(
        params_of(tmp_path / "spec", cnn.specs()), params_of(tmp_path / "cnn", cnn.specs())
    )


def test_dropout_is_keyed_by_seed_and_step_and_off_at_eval(data, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer.train_and_evaluate(spec_config(data, seed=seed), str(tmp_path / name))
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert_trees_equal(params_of(tmp_path / "a"), params_of(tmp_path / "b"))
    without = tuple(s for s in DROPOUT_NET if not s.startswith("dropout"))
    trainer.train_and_evaluate(spec_config(data, without), str(tmp_path / "none"))
    assert records(tmp_path / "none")[0]["train_loss"] != records(tmp_path / "a")[0]["train_loss"]
    # Eval: the trained parameters scored by the same net without dropout layers.
    images = idx.read_idx(data / "t10k-images-idx3-ubyte", ndim=3)[..., None]
    labels = idx.read_idx(data / "t10k-labels-idx1-ubyte", ndim=1)
    logits = models.Sequential(without).apply(
        {"params": params_of(tmp_path / "a")}, images.astype(np.float32) / 255
    )
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    assert records(tmp_path / "a")[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_dropout_under_a_population_is_each_member_s_single_run(data, tmp_path):
    config = spec_config(data, optimizer="sgd")
    config.population.update(size=2, seeds=(3, 5), independent_data_order=True)
    trainer.train_and_evaluate(config, str(tmp_path / "population"))
    stacked = params_of(tmp_path / "population", members=2)
    for k, seed in enumerate((3, 5)):
        trainer.train_and_evaluate(
            spec_config(data, optimizer="sgd", seed=seed), str(tmp_path / f"s{k}")
        )
        assert_trees_close(
            jax.tree.map(lambda x, k=k: x[k], stacked), params_of(tmp_path / f"s{k}")
        )


def test_dropout_on_eight_devices_matches_one_device(data, tmp_path):
    for devices in (1, 8):
        config = spec_config(data, num_devices=devices)
        trainer.train_and_evaluate(config, str(tmp_path / f"d{devices}"))
    assert_trees_close(params_of(tmp_path / "d8"), params_of(tmp_path / "d1"), 1e-5, 1e-6)


def train_py(config_text, data, workdir, *flags):
    path = workdir.parent / f"{workdir.name}_config.py"
    path.write_text(config_text)
    overrides = idx_flags(data)[2:]  # Its first two are --config configs/smoke.py.
    command = [sys.executable, "train.py", f"--config={path}", *overrides, *flags]
    return subprocess.run(
        [*command, "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


CONFIG = """
import ml_collections
from cnnflat_jax.configs import smoke

def get_config():
    config = smoke.get_config()
    config.model = ml_collections.ConfigDict(dict(name="sequential", layers={layers!r}))
    return config
"""


def test_train_py_trains_a_spec_from_a_config_file_and_the_command_line(data, tmp_path):
    result = train_py(CONFIG.format(layers=DROPOUT_NET), data, tmp_path / "file")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "file" / "config.json").read_text())
    assert saved["model"] == {"name": "sequential", "layers": list(DROPOUT_NET)}
    layers = '("flatten","dense:16","relu","dense:3","softmax")'
    result = train_py(
        CONFIG.format(layers=DROPOUT_NET),
        data,
        tmp_path / "flag",
        f"--config.model.layers={layers}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Model: sequential, 1091 parameters" in result.stderr  # 64*16+16 + 16*3+3


@pytest.mark.parametrize(
    "layers,expected",
    [
        (
            ("conv:8:3", "relu", "max_pol:2"),
            "config.model.layers[2]=max_pol:2: unknown layer kind 'max_pol'",
        ),
        (("conv:8:3", "dense:3"), "config.model.layers[1]=dense:3: dense needs a vector"),
        (
            ("conv:8:9:padding=valid", "flatten", "dense:3"),
            "config.model.layers[0]=conv:8:9:padding=valid: on 8x8x1 images: conv2d: dilated "
            "kernel (9, 9) does not fit",
        ),
        (("flatten", "dense:10"), "outputs 10 values per image, but the dataset has 3 classes"),
    ],
)
def test_a_bad_spec_is_one_error_line_naming_the_layer(data, tmp_path, layers, expected):
    result = train_py(CONFIG.format(layers=layers), data, tmp_path / "run")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not re.match(r"[IW]\d{4} ", line)]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()  # Nothing trained.
