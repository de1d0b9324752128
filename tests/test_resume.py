"""Checkpoints: exact resume after SIGKILL, SIGTERM, NaN losses, incompatible configs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import final_params, idx_config, idx_flags, write_idx_dataset

from cnnflat_jax import checkpoints, run_state, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 examples, batch 16: 4 steps an epoch (40 in all), a checkpoint after every step.
RUN = dict(num_epochs=10, steps_per_dispatch=1, checkpoint_every_steps=1)


def start(data, workdir, *flags):
    command = [sys.executable, "train.py", *idx_flags(data, **RUN), *flags]
    return subprocess.Popen(
        [*command, "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def epoch_scores(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["epoch"], r["train_loss"], r["test_loss"]) for r in map(json.loads, lines)]


def assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_idx_dataset(root / "data")
    process = start(data, root / "uninterrupted")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return data, root / "uninterrupted"


def saved_steps(workdir):
    """Completed checkpoints (Orbax renames a checkpoint to its step when done)."""
    directory = workdir / "checkpoints"
    return (
        sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if directory.is_dir() else []
    )


def wait_for_checkpoint(process, workdir, after_step):
    deadline = time.monotonic() + 300
    while not [s for s in saved_steps(workdir) if s > after_step]:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
        time.sleep(0.02)


def test_sigkill_at_arbitrary_points_then_rerun_gives_bit_identical_parameters(
    uninterrupted, tmp_path
):
    data, reference = uninterrupted
    rng = random.Random(0)
    for _ in range(4):
        process = start(data, tmp_path)
        wait_for_checkpoint(process, tmp_path, max(saved_steps(tmp_path), default=0) + 2)
        time.sleep(rng.uniform(0, 0.3))  # Then mid-step, mid-save or mid-eval.
        process.kill()  # SIGKILL: no handler runs.
        process.communicate()
    assert max(saved_steps(tmp_path)) < 40  # Not finished yet: 10 epochs of 4 steps.
    process = start(data, tmp_path)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "Resuming from the checkpoint at step" in err
    assert_bit_identical(final_params(tmp_path), final_params(reference))
    assert epoch_scores(tmp_path) == epoch_scores(reference)  # Each epoch once, same numbers.


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(uninterrupted, tmp_path):
    data, reference = uninterrupted
    process = start(data, tmp_path)
    wait_for_checkpoint(process, tmp_path, 0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    assert "preempted (SIGTERM) at step" in err and "Rerun the same command" in err
    assert "Traceback" not in err
    process = start(data, tmp_path)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert_bit_identical(final_params(tmp_path), final_params(reference))


def test_a_half_written_checkpoint_is_ignored(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    os.remove(tmp_path / "run" / "final_params" / "_CHECKPOINT_METADATA")
    newest = max(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit())
    # What a kill during Orbax's save leaves: a temporary directory, never renamed.
    half = tmp_path / "run" / "checkpoints" / f"{newest + 1}.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "run" / "checkpoints" / str(newest), half)
    for path in half.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:3])
    result = trainer.train_and_evaluate(idx_config(data, **RUN), str(tmp_path / "run"))
    assert result["step"] == newest
    assert not half.exists()


def test_a_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    config = idx_config(data, optimizer="sgd", schedule="constant", learning_rate=1e30, **RUN)
    with pytest.raises(
        run_state.NonFiniteLossError, match=r"NaN or Inf at step (\d+) \(epoch 1\)"
    ) as e:
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    bad_step = int(e.value.args[0].split("at step ")[1].split()[0])
    manager = checkpoints.RunCheckpoints(tmp_path / "run" / "checkpoints", keep=3)
    latest = manager.latest_step()
    assert latest == bad_step - 1
    assert f"the last good checkpoint (step {latest}) is kept" in str(e.value)


def test_an_incompatible_config_is_a_clear_error(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    config = idx_config(data, **RUN)
    config.model.conv_features = (8, 8)
    with pytest.raises(
        checkpoints.IncompatibleCheckpointError,
        match=r"Conv2D_1.*saved \[3, 3, 8, 16\], needed \[3, 3, 8, 8\]",
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    process = start(data, tmp_path, "--config.model.conv_features=(8, 8)")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 1
    assert "error: the checkpoint in" in err and "Traceback" not in err
