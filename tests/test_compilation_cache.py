"""JAX's persistent compilation cache: on by default, per user and CPU, off on request,
shared safely by processes, and changing no result."""

import json
import os
import subprocess
import sys

import jax
import pytest
from helpers import final_params, idx_flags, write_idx_dataset

from cnnflat_jax.train import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def jax_cache_config():
    """Restores the test process's cache settings after a test changes them."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_compilation_cache_max_size",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_default_folder_is_per_user_and_per_cpu(monkeypatch, tmp_path, jax_cache_config):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv(compilation_cache.OFF_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compilation_cache.enable()
    assert os.path.dirname(folder) == str(tmp_path / "cnnflat_jax" / "xla")
    cpu = os.path.basename(folder)
    assert cpu.startswith(os.uname().machine + "-") and len(cpu.rsplit("-", 1)[1]) == 12
    assert jax.config.jax_compilation_cache_dir == folder
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_BYTES  # The lock.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "chosen"))
    assert compilation_cache.enable() == str(tmp_path / "chosen")


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_the_environment_turns_it_off(monkeypatch, value, jax_cache_config):
    monkeypatch.setenv(compilation_cache.OFF_VARIABLE, value)
    assert compilation_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_the_config_field_turns_it_off(jax_cache_config):
    assert compilation_cache.enable(False) is None
    assert jax.config.jax_compilation_cache_dir is None


def train(data, workdir, cache, *flags):
    command = [sys.executable, "train.py", *idx_flags(data), *flags, "--workdir", str(workdir)]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def finish(process):
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def entries(cache):
    return {name for name in os.listdir(cache) if name.endswith("-cache")}


def test_two_runs_filling_one_cache_at_once_and_a_run_loading_it_agree_bit_for_bit(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    together = [train(data, tmp_path / f"cold{i}", cache) for i in range(2)]
    for process in together:
        finish(process)
    filled = entries(cache)
    assert len(filled) >= 5  # The init, the training loop, eval, the data order, ...
    finish(train(data, tmp_path / "warm", cache))
    assert entries(cache) == filled  # Every program came from the cache: none was new.
    finish(train(data, tmp_path / "off", tmp_path / "unused", "--config.compilation_cache=False"))
    assert not (tmp_path / "unused").exists()
    runs = ["cold0", "cold1", "warm", "off"]
    metrics = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in runs]
    scores = [
        [{k: v for k, v in json.loads(line).items() if "sec" not in k} for line in lines]
        for lines in metrics
    ]
    assert scores[0] == scores[1] == scores[2] == scores[3]
    for run in runs[1:]:
        for a, b in zip(jax.tree.leaves(final_params(tmp_path / "cold0")),
                        jax.tree.leaves(final_params(tmp_path / run))):  # fmt: skip
            assert (a == b).all()
