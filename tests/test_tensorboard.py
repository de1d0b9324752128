"""TensorBoard event files: a point per epoch, the figures, members, and no duplicates on resume."""

import glob
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import idx_config, idx_flags, write_idx_dataset
from tensorboard.compat.proto import event_pb2

from cnnflat_jax.run import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(workdir):
    """``{(tag, step): value}`` as TensorBoard loads the run's event files, in order.

    A ``SessionLog.START`` at step s (a writer's ``purge_step``) drops what
    earlier files logged at steps >= s, as TensorBoard does. A (tag, step)
    seen twice is a duplicate point and fails the test.
    """
    points, images = {}, {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data, offset, seen = f.read(), 0, set()
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8].ljust(8, b"\0"))
            if offset + 12 + length + 4 > len(data):
                break  # A record torn by a kill: TensorBoard skips it too.
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                points = {key: v for key, v in points.items() if key[1] < event.step}
            for value in event.summary.value:
                key = (value.tag, event.step)
                assert key not in seen, f"{key} twice in {path}"
                seen.add(key)
                if value.HasField("image"):
                    images[key] = (value.image.height, value.image.width)
                else:
                    points[key] = value.simple_value
    return points, images


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_every_epoch_is_a_point_and_the_figures_are_images(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    trainer.train_and_evaluate(idx_config(data, validation_examples=16), str(tmp_path / "run"))
    points, images = read_events(tmp_path / "run")
    for record in records(tmp_path / "run"):
        epoch = record["epoch"]
        for split in ("train", "validation", "test"):
            for metric in ("loss", "accuracy"):
                value = points.pop((f"{split}/{metric}", epoch))
                assert value == pytest.approx(record[f"{split}_{metric}"], rel=1e-6)
        assert points.pop(("images_per_sec", epoch)) == pytest.approx(record["images_per_sec"])
        assert points.pop(("learning_rate", epoch)) > 0
    assert points == {}  # Nothing else, nothing twice.
    assert set(images) == {("curves", 2), ("confusion", 2), ("misclassified", 2)}
    assert all(h > 100 and w > 100 for h, w in images.values())


def test_the_learning_rate_follows_the_schedule(tmp_path):
    data = write_idx_dataset(tmp_path / "data")  # 64 images, batch 16: 4 steps an epoch.
    config = idx_config(data, num_epochs=4, warmup_epochs=1.0, learning_rate=0.01)
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    points, _ = read_events(tmp_path / "run")
    rates = [points[("learning_rate", epoch)] for epoch in (1, 2, 3, 4)]
    # Warmup over steps 0-4 to the peak, then cosine decay to 0 at step 16;
    # each epoch's point is its last update's (steps 3, 7, 11, 15).
    cosine = [0.5 * (1 + np.cos(np.pi * (step - 4) / 12)) for step in (7, 11, 15)]
    np.testing.assert_allclose(rates, 0.01 * np.array([3 / 4, *cosine]), rtol=1e-5)


def test_a_population_logs_each_member_and_the_ensemble(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    config = idx_config(data)
    config.population.update(size=2, learning_rates=(0.01, 0.002))
    config.schedule = "constant"
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    points, _ = read_events(tmp_path / "run")
    lines = records(tmp_path / "run")
    assert len(lines) == 6  # 2 epochs of: member 0, member 1, the ensemble.
    for record in lines:
        epoch, who = record["epoch"], record["member"]
        prefix = "ensemble" if who == "ensemble" else f"member_{who}"
        assert points[(f"{prefix}/test/accuracy", epoch)] == pytest.approx(record["test_accuracy"])
        assert points[(f"{prefix}/test/loss", epoch)] == pytest.approx(record["test_loss"])
        assert points[("member_0/learning_rate", epoch)] == pytest.approx(0.01)
        assert points[("member_1/learning_rate", epoch)] == pytest.approx(0.002)
        assert points[("member_1/train/loss", epoch)] > 0


def test_a_killed_and_resumed_run_has_each_epoch_once(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    flags = idx_flags(data, num_epochs=6, steps_per_dispatch=1, checkpoint_every_steps=1)
    command = [sys.executable, "train.py", *flags, "--workdir", str(tmp_path / "run")]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.kill()  # After epoch 3's point, somewhere in epoch 4.
    process.wait()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(glob.glob(str(tmp_path / "run" / "tensorboard" / "events.*"))) == 2
    points, _ = read_events(tmp_path / "run")
    assert sorted(step for tag, step in points if tag == "test/accuracy") == [1, 2, 3, 4, 5, 6]
    for record in records(tmp_path / "run"):
        assert points[("test/loss", record["epoch"])] == pytest.approx(record["test_loss"])
