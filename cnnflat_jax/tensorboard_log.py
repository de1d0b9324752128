"""TensorBoard event files in ``workdir/tensorboard/``: one point per epoch, figures at the end.

    tensorboard --logdir runs/

Written with tensorboardX: a maintained writer of TensorBoard's own event
format that needs neither TensorFlow nor a running TensorBoard (Flax's
``flax.metrics.tensorboard`` imports TensorFlow; ``clu.metric_writers`` pins
its own jax). Scalars, with the epoch as the step: ``train/loss``,
``train/accuracy``, ``test/...``, ``validation/...`` when a split is held out,
``images_per_sec`` and ``learning_rate`` (of the epoch's last update). A
population logs each member under ``member_K/`` and the ensemble under
``ensemble/``. At the end: the curves, the confusion matrix and the
misclassified grid as images.

A resumed run opens its writer with ``purge_step`` = its first epoch, so
TensorBoard drops whatever a killed run had logged from that epoch on: no
epoch appears twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DIRECTORY = "tensorboard"
FIGURES = ("curves", "confusion", "misclassified")


class EventLog:
    """Writes a run's epoch records and figures as TensorBoard events."""

    def __init__(self, workdir: str, learning_rates: Callable[[int], Sequence[float]]):
        self.directory = os.path.join(workdir, DIRECTORY)
        self.learning_rates = learning_rates
        self.writer = None

    def write_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (``reporting.epoch_record``), at step = its epoch."""
        epoch = record["epoch"]
        if self.writer is None:
            from tensorboardX import SummaryWriter  # Only a writing process needs it.

            self.writer = SummaryWriter(self.directory, purge_step=epoch)
        rates = list(self.learning_rates(record["step"] - 1))  # The epoch's last update's.
        members = record.get("members", ())
        for k, member in enumerate(members):
            self._scores(f"member_{k}/", member, epoch)
            self.writer.add_scalar(f"member_{k}/learning_rate", rates[k], epoch)
        self._scores("ensemble/" if members else "", record, epoch)
        if not members:
            self.writer.add_scalar("learning_rate", rates[0], epoch)
        self.writer.add_scalar("images_per_sec", record["images_per_sec"], epoch)
        self.writer.flush()

    def _scores(self, prefix: str, record: dict[str, Any], epoch: int) -> None:
        for split in ("train", "validation", "test"):
            for metric in ("loss", "accuracy"):
                if f"{split}_{metric}" in record:
                    value = record[f"{split}_{metric}"]
                    self.writer.add_scalar(f"{prefix}{split}/{metric}", value, epoch)

    def write_figures(self, workdir: str, epoch: int) -> None:
        """The run's figures (PNG files in ``workdir``) as images at the last epoch."""
        if self.writer is None:
            return
        from PIL import Image

        for name in FIGURES:
            path = os.path.join(workdir, f"{name}.png")
            if os.path.exists(path):
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(name, pixels, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
