"""Test helpers: independent numpy references, tiny IDX datasets, import checks."""

from __future__ import annotations

import ast
import contextlib
import gzip
import math
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnflat_jax.configs import smoke
from cnnflat_jax.nn import models
from cnnflat_jax.run import checkpoints
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import sharding, train_lib


def same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding for one dimension, extra cell at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def resolve_pads(padding, hw, windows, strides):
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        return tuple(same_pads(s, w, st) for s, w, st in zip(hw, windows, strides))
    return padding


def conv2d_ref(x, k, b=None, stride=(1, 1), padding="SAME", dilation=(1, 1)):
    """Direct float64 cross-correlation, NHWC x HWIO, by summing kernel taps."""
    x = np.asarray(x, np.float64)
    k = np.asarray(k, np.float64)
    kh, kw, _, c_out = k.shape
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    (t, bo), (le, r) = resolve_pads(padding, x.shape[1:3], eff, stride)
    xp = np.pad(x, ((0, 0), (t, bo), (le, r), (0, 0)))
    ho = (xp.shape[1] - eff[0]) // stride[0] + 1
    wo = (xp.shape[2] - eff[1]) // stride[1] + 1
    y = np.zeros((x.shape[0], ho, wo, c_out))
    for p in range(kh):
        for q in range(kw):
            i0, j0 = p * dilation[0], q * dilation[1]
            patch = xp[:, i0 : i0 + stride[0] * (ho - 1) + 1 : stride[0],
                       j0 : j0 + stride[1] * (wo - 1) + 1 : stride[1], :]  # fmt: skip
            y += patch @ k[p, q]
    return y if b is None else y + np.asarray(b, np.float64)


def pool_ref(x, window, stride, padding, kind):
    """Loop-based pooling; padded cells are ignored (never max, never counted)."""
    x = np.asarray(x, np.float64)
    (t, bo), (le, r) = resolve_pads(padding, x.shape[1:3], window, stride)
    xp = np.pad(x, ((0, 0), (t, bo), (le, r), (0, 0)), constant_values=np.nan)
    ho = (xp.shape[1] - window[0]) // stride[0] + 1
    wo = (xp.shape[2] - window[1]) // stride[1] + 1
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    reduce = np.nanmax if kind == "max" else np.nanmean
    for i in range(ho):
        for j in range(wo):
            win = xp[:, i * stride[0] : i * stride[0] + window[0],
                     j * stride[1] : j * stride[1] + window[1], :]  # fmt: skip
            y[:, i, j, :] = reduce(win, axis=(1, 2))
    return y


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialises a uint8 array in the IDX format."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_dataset(directory, num_train=64, num_test=37, size=8, num_classes=3, seed=0):
    """Writes a tiny learnable IDX dataset: each class lights one image band."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for prefix, n, compress in (("train", num_train, True), ("t10k", num_test, False)):
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
        band = size // num_classes
        for i, label in enumerate(labels):
            images[i, label * band : (label + 1) * band, :] += 180
        for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
            path = os.path.join(directory, f"{prefix}-{kind}-ubyte")
            if compress:
                with gzip.open(path + ".gz", "wb") as f:
                    f.write(idx_bytes(data))
            else:
                with open(path, "wb") as f:
                    f.write(idx_bytes(data))
    return directory


def idx_config(directory, **overrides):
    """The smoke config on a tiny 3-class IDX dataset: batch 16, eval batch 8, 2 epochs."""
    config = smoke.get_config()
    config.data_source = "idx"
    config.idx_dir = str(directory)
    config.num_test_examples = 0
    config.num_classes = 3
    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_epochs = 2
    for key, value in overrides.items():
        config[key] = value
    return config


def idx_flags(directory, **overrides) -> list[str]:
    """``idx_config``'s settings as ``train.py --config.FIELD=VALUE`` flags."""
    config = idx_config(directory, **overrides)
    smoke_config = smoke.get_config()
    flags = ["--config", "configs/smoke.py"]
    for key, value in config.items():
        if not isinstance(value, (int, float, str)) or value == smoke_config[key]:
            continue
        flags.append(f"--config.{key}={value}")
    return flags


def final_params(workdir, num_classes=3, members=0):
    """The final parameters that ``idx_config``'s model wrote to ``workdir``."""
    config = idx_config("unused")
    fields = dict(config.model)
    model = models.create_model(fields.pop("name"), num_classes, **fields)
    like = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    if members:
        like = jax.tree.map(lambda x: jnp.zeros((members, *x.shape), x.dtype), like)
    return checkpoints.load_params(workdir_lib.path(workdir, workdir_lib.FINAL_PARAMS), like)


def step_program(state, batch_size, *, loop="per_step", steps=1, max_loss=0.0):
    """``build_train``'s program for one model on one device, on 8x8x1 images."""
    return train_lib.build_train(
        state, sharding.data_mesh(1), loop=loop, mode="single", steps=steps,
        batch_size=batch_size, image_shape=(8, 8, 1), max_loss=max_loss,
    )  # fmt: skip


def one_step(program, state, batch):
    """One batch through a one-step program: ``(state, metric sums)``."""
    state, sums, _ = program(state, {k: np.asarray(v)[None] for k, v in batch.items()})
    return state, sums


def assert_rounding_close(actual, expected, rel=1e-5):
    """Equal up to float32 rounding: every difference within ``rel`` of the
    largest magnitude in ``expected`` (logits of ~40 carry errors of ~1e-5)."""
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def loaded_by(imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after ``import {imports}``."""
    code = f"import sys, {imports}; print([m for m in {modules!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout)


@contextlib.contextmanager
def tmpfs(path, size, *options):
    """A small tmpfs mounted at ``path`` (the tests that need one run as root)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                    str(path)], check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


AS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"),
    reason="mounting a small or read-only tmpfs needs root (CI runs as root)",
)
