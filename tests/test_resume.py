"""Checkpoints: exact resume after SIGKILL, SIGTERM, NaN losses, incompatible configs."""

import contextlib
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
from helpers import AS_ROOT, final_params, idx_config, idx_flags, tmpfs, write_idx_dataset

from cnnflat_jax.data import array_records, input_pipeline
from cnnflat_jax.run import checkpoints, run_state, trainer

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


def kill_at_random_points_then_finish(data, workdir, *flags):
    """SIGKILLs ``train.py`` four times, mid-step, mid-save or mid-eval, then
    reruns it to the end, which must resume."""
    rng = random.Random(0)
    for _ in range(4):
        process = start(data, workdir, *flags)
        wait_for_checkpoint(process, workdir, max(saved_steps(workdir), default=0) + 2)
        time.sleep(rng.uniform(0, 0.3))
        process.kill()  # SIGKILL: no handler runs.
        process.communicate()
    assert max(saved_steps(workdir)) < 40  # Not finished yet: 10 epochs of 4 steps.
    process = start(data, workdir, *flags)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "Resuming from the checkpoint at step" in err


def test_sigkill_at_arbitrary_points_then_rerun_gives_bit_identical_parameters(
    uninterrupted, tmp_path
):
    data, reference = uninterrupted
    kill_at_random_points_then_finish(data, tmp_path)
    assert_bit_identical(final_params(tmp_path), final_params(reference))
    assert epoch_scores(tmp_path) == epoch_scores(reference)  # Each epoch once, same numbers.


def test_grain_sigkill_mid_epoch_then_rerun_ends_bit_identical(uninterrupted, tmp_path):
    data, _ = uninterrupted
    loaded = input_pipeline.load_dataset("fashion_mnist", idx_dir=str(data), num_classes=3)
    splits = {
        "train": (loaded.train.images, loaded.train.labels),
        "test": (loaded.test_images, loaded.test_labels),
    }
    array_records.write(str(tmp_path / "records"), "fashion_mnist", 3, splits)
    grain = ["--config.input_pipeline=grain", f"--config.array_record_dir={tmp_path / 'records'}"]
    process = start(data, tmp_path / "reference", *grain)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    kill_at_random_points_then_finish(data, tmp_path / "run", *grain)
    assert_bit_identical(final_params(tmp_path / "run"), final_params(tmp_path / "reference"))
    assert epoch_scores(tmp_path / "run") == epoch_scores(tmp_path / "reference")
    # Mid-epoch checkpoints hold Grain's iterator state: at step 4e + d, dispatch d is next.
    step = next(s for s in saved_steps(tmp_path / "run") if s % 4)
    progress = json.loads(
        (tmp_path / "run" / "checkpoints" / str(step) / "progress" / "metadata").read_text()
    )
    assert progress["dispatch"] == step % 4 and progress["data_state"] == {"next_index": step % 4}


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
    config.max_loss = 0.0  # Only NaN and Inf stop the run.
    with pytest.raises(run_state.DivergedError, match=r"NaN or Inf at step (\d+) \(epoch 1\)") as e:
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


def run_to_end(data, workdir, *flags):
    process = start(data, workdir, *flags)
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def assert_one_error_line(err, *parts):
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]


def test_sigint_saves_a_checkpoint_and_exits_130_then_resumes(uninterrupted, tmp_path):
    data, reference = uninterrupted
    process = start(data, tmp_path)
    wait_for_checkpoint(process, tmp_path, 0)
    process.send_signal(signal.SIGINT)  # What Ctrl-C sends.
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "interrupted (SIGINT) at step" in err and "Traceback" not in err
    assert 0 < max(saved_steps(tmp_path)) < 40
    returncode, err = run_to_end(data, tmp_path)
    assert returncode == 0, err[-3000:]
    assert_bit_identical(final_params(tmp_path), final_params(reference))
    assert epoch_scores(tmp_path) == epoch_scores(reference)


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_ends_bit_identical(
    uninterrupted, tmp_path
):
    data, reference = uninterrupted
    process = start(data, tmp_path)
    wait_for_checkpoint(process, tmp_path, 12)
    process.kill()
    process.communicate()
    # The finished checkpoints, as Orbax lists them (a kill can leave a step
    # directory half-deleted or never finalised).
    newest, second, third = checkpoints.RunCheckpoints(tmp_path / "checkpoints", 3).all_steps()[:3]
    for path in (tmp_path / "checkpoints" / str(newest)).rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:10])  # Truncated data files.
    os.remove(tmp_path / "checkpoints" / str(second) / "state" / "_METADATA")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # A line torn by the kill.
    returncode, err = run_to_end(data, tmp_path)
    assert returncode == 0, err[-3000:]
    assert "Traceback" not in err, err
    damaged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(damaged) == 2, err[-3000:]
    assert f"step {newest} is damaged" in damaged[0] and f"step {second} is damaged" in damaged[1]
    assert f"Resuming from the checkpoint at step {third} " in err
    assert "dropped line" in err
    assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == sorted(
        [str(newest), str(second)]
    )
    assert_bit_identical(final_params(tmp_path), final_params(reference))
    assert epoch_scores(tmp_path) == epoch_scores(reference)


def test_no_intact_checkpoint_is_one_error_line(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoints").rglob("_METADATA"):
        path.unlink()
    returncode, err = run_to_end(data, tmp_path / "run")
    assert returncode == 1
    assert_one_error_line(err, "no intact checkpoint in", "are damaged")


def test_a_garbage_line_in_metrics_is_dropped(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join([*lines, "\x00\x01garbage"]))
    returncode, err = run_to_end(data, tmp_path / "run")
    assert returncode == 0, err[-3000:]
    assert "dropped line 11, not a record" in err and "Traceback" not in err
    assert epoch_scores(tmp_path / "run") == epoch_scores(reference)


def test_json_lines_of_the_wrong_types_are_dropped_like_torn_ones(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    wrong = ['{"epoch": "1"}', '{"epoch": 1e999}', '{"epoch": 2, "train_loss": "low"}', "[1]", "7"]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join([*wrong, *lines]) + "\n")
    returncode, err = run_to_end(data, tmp_path / "run")
    assert returncode == 0, err[-3000:]
    for number in range(1, len(wrong) + 1):
        assert f"dropped line {number}, not a record" in err
    assert "Traceback" not in err
    assert epoch_scores(tmp_path / "run") == epoch_scores(reference)


def test_a_metrics_file_deleted_during_the_run_is_rebuilt(uninterrupted, tmp_path):
    data, reference = uninterrupted
    process = start(data, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or metrics.read_text().count("\n") < 1:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    metrics.unlink()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "metrics.jsonl was deleted during the run; rebuilt it" in err
    assert epoch_scores(tmp_path) == epoch_scores(reference)
    process = start(data, tmp_path / "second")  # Deleted between runs: rebuilt on resume.
    wait_for_checkpoint(process, tmp_path / "second", 12)
    process.kill()
    process.communicate()
    (tmp_path / "second" / "metrics.jsonl").unlink()
    returncode, err = run_to_end(data, tmp_path / "second")
    assert returncode == 0, err[-3000:]
    assert "record(s) from the checkpoint" in err
    assert epoch_scores(tmp_path / "second") == epoch_scores(reference)


def test_resuming_with_another_config_is_refused_and_config_json_kept(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_bytes()
    returncode, err = run_to_end(
        data, tmp_path / "run", "--config.batch_size=8", "--config.learning_rate=0.01"
    )
    assert returncode == 1
    assert_one_error_line(
        err, "holds a run with another config", "batch_size 16 -> 8",
        "learning_rate 0.002 -> 0.01", "another --workdir",
    )  # fmt: skip
    returncode, err = run_to_end(data, tmp_path / "run", "--config.num_epochs=12")
    assert returncode == 1
    assert_one_error_line(err, "num_epochs 10 -> 12", "not extended")
    assert (tmp_path / "run" / "config.json").read_bytes() == before
    # How the run is watched may change: the rerun resumes (and finds it finished).
    returncode, err = run_to_end(data, tmp_path / "run", "--config.progress_bar=True")
    assert returncode == 0, err[-3000:]
    assert (tmp_path / "run" / "config.json").read_bytes() == before
    (tmp_path / "run" / "config.json").write_text("[]")  # Damaged: not the run's config.
    returncode, err = run_to_end(data, tmp_path / "run")
    assert returncode == 1
    assert_one_error_line(err, "config.json is unreadable", "it describes the run to resume")


def test_a_deleted_or_edited_config_json_cannot_switch_the_resume_checks_off(
    uninterrupted, tmp_path
):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    config_json = tmp_path / "run" / "config.json"
    original = json.loads(config_json.read_text())
    config_json.unlink()
    other = ("--config.learning_rate=0.01", "--config.seed=3", "--config.augment_shift=1")
    returncode, err = run_to_end(data, tmp_path / "run", *other)
    assert returncode == 1
    assert_one_error_line(
        err, "learning_rate 0.002 -> 0.01", "seed 0 -> 3", "augment_shift 0 -> 1",
        "saved in its checkpoints",
    )  # fmt: skip
    edited = {**original, "learning_rate": 0.01, "seed": 3, "augment_shift": 1}
    config_json.write_text(json.dumps(edited))  # Edited to match the rerun: still refused.
    returncode, err = run_to_end(data, tmp_path / "run", *other)
    assert returncode == 1
    assert_one_error_line(err, "learning_rate 0.002 -> 0.01", "saved in its checkpoints")
    config_json.unlink()
    returncode, err = run_to_end(data, tmp_path / "run")  # The run's own config: rebuilt.
    assert returncode == 0, err[-3000:]
    assert "config.json was missing or edited; rebuilt it from the checkpoint" in err
    assert json.loads(config_json.read_text()) == original
    assert epoch_scores(tmp_path / "run") == epoch_scores(reference)


def test_other_data_at_another_location_is_another_run(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    shutil.copytree(data, tmp_path / "moved")
    returncode, err = run_to_end(data, tmp_path / "run", f"--config.idx_dir={tmp_path / 'moved'}")
    assert returncode == 1
    assert_one_error_line(err, f"idx_dir {data} -> {tmp_path / 'moved'}")


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_is_unharmed(
    uninterrupted, tmp_path
):
    data, reference = uninterrupted
    first = start(data, tmp_path)
    wait_for_checkpoint(first, tmp_path, 0)
    returncode, err = run_to_end(data, tmp_path)
    assert returncode == 1
    assert_one_error_line(err, f"{tmp_path} is in use by process {first.pid}")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert_bit_identical(final_params(tmp_path), final_params(reference))
    assert epoch_scores(tmp_path) == epoch_scores(reference)  # No epoch twice.


def test_the_lock_dies_with_its_process(uninterrupted, tmp_path):
    data, reference = uninterrupted
    process = start(data, tmp_path)
    wait_for_checkpoint(process, tmp_path, 0)
    process.kill()  # No handler runs, no cleanup: the kernel drops the lock.
    process.communicate()
    assert (tmp_path / ".lock").exists()
    returncode, err = run_to_end(data, tmp_path)
    assert returncode == 0, err[-3000:]


def test_a_huge_finite_loss_stops_the_run_like_a_nan(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    flags = ["--config.optimizer=sgd", "--config.schedule=constant", "--config.learning_rate=1e6"]
    returncode, err = run_to_end(data, tmp_path / "run", *flags)
    assert returncode == 1
    assert_one_error_line(err, "above config.max_loss=10000 at step", "(epoch 1)", "is kept in")


@AS_ROOT
def test_a_full_disk_is_one_error_line_and_the_last_checkpoint_survives(uninterrupted, tmp_path):
    data, reference = uninterrupted
    with tmpfs(tmp_path / "disk", "16m") as disk:  # Room for the run; the filler takes the rest.
        process = start(data, disk / "run")
        try:
            wait_for_checkpoint(process, disk / "run", 8)
            filler = disk / "filler"
            # Fill every free byte, as another program would (a disk already full
            # refuses even the file: CI has seen that once).
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            _, err = process.communicate(timeout=300)
        finally:
            process.kill()
            process.communicate()
        assert process.returncode == 1
        assert_one_error_line(err, "No space left on device", str(disk / "run"))
        filler.unlink(missing_ok=True)
        returncode, err = run_to_end(data, disk / "run")
        assert returncode == 0, err[-3000:]
        assert_bit_identical(final_params(disk / "run"), final_params(reference))
        assert epoch_scores(disk / "run") == epoch_scores(reference)


@AS_ROOT
def test_an_unusable_workdir_is_one_error_line(uninterrupted, tmp_path):
    data, _ = uninterrupted
    (tmp_path / "file").write_text("not a directory")
    cases = {
        tmp_path / "file": "it is a file",
        tmp_path / "file" / "run": "Not a directory",
    }
    with tmpfs(tmp_path / "readonly", "1m", "ro") as readonly:
        cases[readonly / "run"] = "Read-only file system"
        for workdir, why in cases.items():
            returncode, err = run_to_end(data, workdir)
            assert returncode == 1
            assert_one_error_line(err, f"cannot use {workdir} as the workdir: {why}")
