"""gs:// run directories and data, against a local Cloud Storage emulator.

Each run is ``train.py`` in a subprocess pointed at the emulator (the
``gcs`` fixture), compared with the same run on the local disk.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import final_params, idx_flags, write_idx_dataset

from cnnflat_jax.data import array_records, input_pipeline
from cnnflat_jax.run import trained_run
from cnnflat_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 examples, batch 16: 4 steps an epoch, 12 in all, a checkpoint after every step.
RUN = dict(num_epochs=3, steps_per_dispatch=1, checkpoint_every_steps=1)
LAST_STEP = 12


def start(data, workdir, env, *flags, **overrides):
    command = [sys.executable, "train.py", *idx_flags(data, **{**RUN, **overrides}), *flags]
    return subprocess.Popen(
        [*command, "--workdir", str(workdir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process):
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def remote(path):
    from etils import epath

    return epath.Path(path)


def epoch_scores(workdir):
    lines = workdir_lib.read_text(workdir_lib.path(workdir, "metrics.jsonl")).splitlines()
    return [(r["epoch"], r["train_loss"], r["test_loss"]) for r in map(json.loads, lines)]


def saved_steps(workdir):
    """The finished checkpoints, newest first, read without touching them (an Orbax
    manager opened here would clean up the running save as an unfinished one)."""
    folder = workdir_lib.path(workdir, "checkpoints")
    return sorted(
        (int(name) for name in workdir_lib.list_names(folder)
         if name.isdigit() and workdir_lib.exists(f"{folder}/{name}/commit_success.txt")),
        reverse=True,
    )  # fmt: skip


def assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("cloud") / "data")


@pytest.fixture(scope="module")
def on_disk(data, tmp_path_factory):
    """The reference: the same run, on the local disk."""
    workdir = tmp_path_factory.mktemp("cloud") / "on_disk"
    finish(start(data, workdir, os.environ))
    return workdir


@pytest.fixture(scope="module")
def on_gcs(gcs, data):
    """The run with a gs:// workdir."""
    workdir = gcs.bucket() + "/run"
    err = finish(start(data, workdir, {**os.environ, **gcs.env}))
    return workdir, err


def test_a_run_on_gs_writes_there_and_matches_the_run_on_disk(on_gcs, on_disk):
    workdir, _ = on_gcs
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # Nothing local named after the URI.
    names = workdir_lib.list_names(workdir)
    for name in ("config.json", "metrics.jsonl", "checkpoints", "final_params", "data.json",
                 "tensorboard", "curves.png", "confusion.png"):  # fmt: skip
        assert name in names, names
    assert ".lock" not in names  # The lease is given back at the end.
    assert epoch_scores(workdir) == epoch_scores(on_disk)
    assert_bit_identical(final_params(workdir), final_params(on_disk))
    run = trained_run.load_run(workdir)
    assert run.data["image_shape"] == [8, 8, 1]
    assert_bit_identical(run.params, final_params(on_disk))


# TensorBoard's own reader, as ``tensorboard --logdir gs://...`` loads a run. TensorFlow's
# GCS client cannot be pointed at an emulator, so TensorBoard is made to use its own file
# layer (fsspec, as it does where TensorFlow is absent) by the module that Bazel builds of
# TensorBoard link in for that ("//tensorboard/compat:no_tensorflow").
READ_SCALARS = """
import json, sys, types
sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
from tensorboard.backend.event_processing import event_accumulator
events = event_accumulator.EventAccumulator(sys.argv[1])
events.Reload()
print(json.dumps({"loss": [(e.step, e.value) for e in events.Scalars("train/loss")],
                  "images": events.Tags()["images"]}))
"""


def test_tensorboards_own_reader_loads_the_events_from_gs(gcs, on_gcs):
    pytest.importorskip("tensorboard")
    workdir, _ = on_gcs
    result = subprocess.run(
        [sys.executable, "-c", READ_SCALARS, workdir_lib.path(workdir, "tensorboard")],
        env={**os.environ, **gcs.env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(result.stdout)
    records = [json.loads(line) for line in workdir_lib.read_text(workdir + "/metrics.jsonl")
               .splitlines()]  # fmt: skip
    assert [step for step, _ in events["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in events["loss"]], [r["train_loss"] for r in records])
    assert "curves" in events["images"]


def test_a_rerun_on_gs_resumes_after_sigkill_at_random_points_bit_identical(gcs, data, on_disk):
    workdir = gcs.bucket() + "/run"
    env = {**os.environ, **gcs.env}
    lease = "--config.workdir_lease_sec=2"  # A killed run's lease lapses before the next starts.
    rng = random.Random(0)
    for _ in range(3):
        process = start(data, workdir, env, lease)
        target = max(saved_steps(workdir), default=0) + 2
        deadline = time.monotonic() + 300
        while max(saved_steps(workdir), default=0) < target:
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.communicate()
        time.sleep(2)
    assert max(saved_steps(workdir)) < LAST_STEP
    err = finish(start(data, workdir, env, lease))
    assert "Resuming from the checkpoint at step" in err
    assert epoch_scores(workdir) == epoch_scores(on_disk)
    assert_bit_identical(final_params(workdir), final_params(on_disk))


def test_a_damaged_newest_checkpoint_on_gs_is_set_aside(gcs, data, on_disk):
    workdir = gcs.bucket() + "/run"
    env = {**os.environ, **gcs.env}
    finish(start(data, workdir, env))
    newest, second = saved_steps(workdir)[:2]
    state = remote(workdir_lib.path(workdir, f"checkpoints/{newest}/state"))
    damaged = 0
    for path in state.glob("*/d/*"):  # OCDBT's data files.
        path.write_bytes(path.read_bytes()[:10])  # Truncated.
        damaged += 1
    assert damaged
    err = finish(start(data, workdir, env))
    assert f"step {newest} is damaged" in err, err[-3000:]
    assert f"Resuming from the checkpoint at step {second} " in err
    assert workdir_lib.list_names(workdir + "/damaged_checkpoints") == [str(newest)]
    assert epoch_scores(workdir) == epoch_scores(on_disk)
    assert_bit_identical(final_params(workdir), final_params(on_disk))


def test_grain_streams_array_records_from_gs(gcs, data, on_disk, tmp_path):
    loaded = input_pipeline.load_dataset("fashion_mnist", idx_dir=str(data), num_classes=3)
    splits = {
        "train": (loaded.train.images, loaded.train.labels),
        "test": (loaded.test_images, loaded.test_labels),
    }
    array_records.write(str(tmp_path / "records"), "fashion_mnist", 3, splits)
    records = gcs.bucket() + "/records"
    for name in os.listdir(tmp_path / "records"):
        remote(f"{records}/{name}").write_bytes((tmp_path / "records" / name).read_bytes())
    workdir = gcs.bucket() + "/run"
    grain = ["--config.input_pipeline=grain", f"--config.array_record_dir={records}"]
    finish(start(data, workdir, {**os.environ, **gcs.env}, *grain))
    assert epoch_scores(workdir) == epoch_scores(on_disk)  # The same batches as in memory.


def test_idx_files_are_read_from_gs(gcs, data, on_disk, tmp_path):
    idx_dir = gcs.bucket() + "/idx"
    for name in os.listdir(data):
        remote(f"{idx_dir}/{name}").write_bytes((data / name).read_bytes())
    err = finish(start(idx_dir, tmp_path / "run", {**os.environ, **gcs.env}))
    assert f"from IDX files in {idx_dir}" in err
    assert epoch_scores(tmp_path / "run") == epoch_scores(on_disk)


def run_command(env, *args):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_export_to_gs_and_predict_from_gs(gcs, on_gcs, on_disk, tmp_path):
    workdir, _ = on_gcs
    env = {**os.environ, **gcs.env}
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    uploaded = gcs.bucket() + "/images.npy"
    remote(uploaded).write_bytes((tmp_path / "images.npy").read_bytes())
    predictions = []
    for run, inputs in ((workdir, uploaded), (str(on_disk), str(tmp_path / "images.npy"))):
        result = run_command(env, "cnnflat_jax.export", f"--workdir={run}")
        assert result.returncode == 0, result.stderr[-3000:]
        result = run_command(env, "cnnflat_jax.predict", f"--workdir={run}", inputs)
        assert result.returncode == 0, result.stderr[-3000:]
        predictions.append([line.split("\t", 1)[1] for line in result.stdout.splitlines()])
    assert workdir_lib.exists(workdir + "/export/model.jax")
    assert len(predictions[0]) == 5 and predictions[0] == predictions[1]


def test_a_missing_object_is_named_by_its_gs_uri(gcs, tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((8, 8, 1), np.uint8))
    workdir = gcs.bucket() + "/never_exported"
    result = run_command(
        {**os.environ, **gcs.env}, "cnnflat_jax.predict", f"--workdir={workdir}",
        str(tmp_path / "image.npy"),
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert f"{workdir}/export/classes.json" in errors[0] and "%2F" not in errors[0], errors[0]


def test_a_workdir_with_doubled_slashes_is_one_place(gcs, data):
    from google.cloud import storage

    bucket = gcs.bucket()
    command = [sys.executable, "train.py", *idx_flags(data, **{**RUN, "num_epochs": 1}),
               "--workdir", bucket + "//run"]  # fmt: skip
    result = second_run(command, {**os.environ, **gcs.env})
    assert result.returncode == 0, result.stderr[-3000:]
    names = [blob.name for blob in storage.Client().list_blobs(bucket.removeprefix("gs://"))]
    assert names and all(name.startswith("run/") for name in names), names
    assert any(name.startswith("run/tensorboard/") for name in names), names


def lease_generation(workdir):
    from google.cloud import storage

    bucket, _, name = workdir.removeprefix("gs://").partition("/")
    blob = storage.Client().bucket(bucket).get_blob(f"{name}/.lock")
    return blob and blob.generation


def test_a_second_run_is_refused_while_the_lease_is_live_and_takes_over_once_its_holder_died(
    gcs, data
):
    workdir = gcs.bucket() + "/run"
    env = {**os.environ, **gcs.env}
    flags = ["--config.workdir_lease_sec=15", "--config.num_epochs=200"]
    first = start(data, workdir, env, *flags)
    deadline = time.monotonic() + 300
    while not saved_steps(workdir):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    assert_in_use(second_run(first.args, env), workdir, f"process {first.pid} on ")
    generation = lease_generation(workdir)
    time.sleep(6)  # Renewed every quarter of the lease while the run lives.
    assert first.poll() is None and lease_generation(workdir) != generation
    first.kill()
    first.communicate()
    # Its lease has not lapsed, but its holder ran here and is gone: taken over at once,
    # as a disk's flock dies with its process. The rerun stops after its first epoch (a
    # field that is not part of the run's identity, so the run is the killed one's).
    result = second_run(first.args, env, "--config.stop_at_test_accuracy=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint" in result.stderr
    taken = [line for line in result.stderr.splitlines() if "Took over the lease" in line]
    assert len(taken) == 1 and f"from process {first.pid} on " in taken[0], result.stderr[-3000:]
    assert "it ran on this machine and has ended" in taken[0]  # Not lapsed: at once.


def test_a_lease_held_from_another_machine_is_taken_over_only_once_it_lapses(gcs, data):
    from google.cloud import storage

    workdir = gcs.bucket() + "/run"
    env = {**os.environ, **gcs.env}
    bucket, _, name = workdir.removeprefix("gs://").partition("/")
    held = {"holder": "process 7 on another-vm", "lease_sec": 12, "machine": "another-vm/b/1",
            "pid": os.getpid(), "started": "1"}  # fmt: skip
    storage.Client().bucket(bucket).blob(f"{name}/.lock").upload_from_string(json.dumps(held))
    written_at = time.monotonic()
    command = [sys.executable, "train.py", *idx_flags(data, **RUN), "--workdir", workdir]
    assert_in_use(second_run(command, env), workdir, "process 7 on another-vm")
    assert not workdir_lib.exists(workdir + "/config.json")  # Refused before writing.
    time.sleep(max(0.0, written_at + 13 - time.monotonic()))
    result = second_run(command, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from process 7 on another-vm (not renewed for " in result.stderr
    assert epoch_scores(workdir)[-1][0] == RUN["num_epochs"]


@pytest.mark.parametrize("lease_sec", [None, "soon", -1])
def test_a_hand_edited_lease_is_read_as_a_lease_of_this_run_s_seconds(gcs, data, lease_sec):
    from google.cloud import storage

    workdir = gcs.bucket() + "/run"
    bucket, _, name = workdir.removeprefix("gs://").partition("/")
    held = {"holder": "process 7 on another-vm", "lease_sec": lease_sec}
    storage.Client().bucket(bucket).blob(f"{name}/.lock").upload_from_string(json.dumps(held))
    command = [sys.executable, "train.py", *idx_flags(data, **RUN), "--workdir", workdir]
    assert_in_use(
        second_run(command, {**os.environ, **gcs.env}), workdir, "process 7 on another-vm"
    )


def test_a_lease_taken_over_mid_run_is_always_its_one_error_line(gcs, data):
    """Another holder writes the lease while the run saves a checkpoint every step
    (each save holds stderr back for Orbax's noise): the run's line still comes."""
    from google.cloud import storage

    workdir = gcs.bucket() + "/run"
    bucket, _, name = workdir.removeprefix("gs://").partition("/")
    process = start(
        data, workdir, {**os.environ, **gcs.env}, "--config.workdir_lease_sec=4", num_epochs=500
    )
    try:
        deadline = time.monotonic() + 120
        while not workdir_lib.list_names(workdir + "/checkpoints") and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.2)
        held = {"holder": "process 9 on another-vm", "lease_sec": 4}
        lock = storage.Client().bucket(bucket).blob(f"{name}/.lock")
        lock.upload_from_string(json.dumps(held))
        _, err = process.communicate(timeout=120)
    finally:
        finish_all_killed([process])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert errors == [
        f"error: this run lost its lease on {workdir} to another run (this one was stalled "
        "for more than 4 s); stopping without writing more"
    ], err[-3000:]


@pytest.mark.parametrize(
    "workdir,expected",
    [
        ("gs://no-such-bucket-here/run", "there is no bucket 'no-such-bucket-here'"),
        ("gs://", "not gs://BUCKET/FOLDER"),
        ("gs:///run", "not gs://BUCKET/FOLDER"),
    ],
)
def test_a_workdir_in_no_bucket_is_one_error_line(gcs, data, workdir, expected):
    command = [sys.executable, "train.py", *idx_flags(data, **RUN), "--workdir", workdir]
    result = second_run(command, {**os.environ, **gcs.env})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == [f"error: cannot use {workdir} as the workdir: {expected}"], errors


def second_run(command, env, *more):
    return subprocess.run(
        [*command, *more], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def assert_in_use(result, workdir, holder):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert f"error: {workdir} is in use by {holder}" in errors[0], errors[0]


def start_processes(data, workdir, env, count, *flags):
    """``count`` processes of one run (gloo over localhost), 2 CPU devices each; one
    silent for 10 s counts as lost (a survivor waiting at a checkpoint's barrier
    learns of a killed peer only from the missing heartbeats)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return [
        start(data, workdir, env, f"--coordinator_address={address}",
              f"--num_processes={count}", f"--process_id={i}",
              "--config.peer_timeout_sec=10", *flags)
        for i in range(count)
    ]  # fmt: skip


def finish_all(processes):
    try:
        return [finish(p) for p in processes]
    finally:
        finish_all_killed(processes)


def finish_all_killed(processes):
    """A failed test leaves none of its processes running into the next one."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def assert_written_by_process_0_and_saved_by_all(workdir, count, errs):
    assert "epoch 3/3" in errs[0] and not any("epoch 3/3" in err for err in errs[1:])
    assert len(workdir_lib.list_names(workdir + "/tensorboard")) == 1  # One writer.
    assert [r[0] for r in epoch_scores(workdir)] == [1, 2, 3]  # Each epoch once.
    state = workdir_lib.list_names(f"{workdir}/checkpoints/{saved_steps(workdir)[0]}/state")
    assert {f"ocdbt.process_{i}" for i in range(count)} <= set(state)


def kill_one_mid_run(processes, workdir, victim):
    """Kills process ``victim`` after two checkpoints; the others must stop on
    their own, soon, each in one line."""
    try:
        deadline = time.monotonic() + 300
        while len(saved_steps(workdir)) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
            time.sleep(0.05)
        processes[victim].kill()
        killed_at = time.monotonic()
        for i, process in enumerate(processes):
            _, err = process.communicate(timeout=150)
            if i == victim:
                continue
            assert time.monotonic() - killed_at < 150
            assert process.returncode != 0
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, err[-3000:]
            assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    finally:
        finish_all_killed(processes)


def test_two_hosts_on_gs_stop_together_when_one_dies_and_resume_exactly(gcs, data):
    env = {**os.environ, **gcs.env}
    reference = gcs.bucket() + "/run"
    errs = finish_all(start_processes(data, reference, env, 2))
    assert_written_by_process_0_and_saved_by_all(reference, 2, errs)
    workdir = gcs.bucket() + "/run"
    kill_one_mid_run(start_processes(data, workdir, env, 2), workdir, victim=1)
    assert max(saved_steps(workdir)) < LAST_STEP
    errs = finish_all(start_processes(data, workdir, env, 2))
    assert "Resuming from the checkpoint" in errs[0]
    assert epoch_scores(workdir) == epoch_scores(reference)
    assert_bit_identical(final_params(workdir), final_params(reference))


def test_four_hosts_on_gs_stop_when_process_0_dies_then_resume(gcs, data):
    env = {**os.environ, **gcs.env}
    workdir = gcs.bucket() + "/run"
    # Killed, process 0 holds the lease no more: the rerun on this machine takes it at once.
    kill_one_mid_run(start_processes(data, workdir, env, 4), workdir, victim=0)
    errs = finish_all(start_processes(data, workdir, env, 4))
    assert "Resuming from the checkpoint" in errs[0]
    assert_written_by_process_0_and_saved_by_all(workdir, 4, errs)
