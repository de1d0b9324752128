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

A resumed run starts its event file with a purge at its first epoch (what
``SummaryWriter(purge_step=...)`` writes), so TensorBoard drops whatever a
killed run had logged from that epoch on: no epoch appears twice. Events are
written and flushed synchronously, before the epoch's checkpoint: a kill
after the checkpoint cannot lose the epoch's points (``SummaryWriter``
queues them for a background thread, which a kill can beat).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cnnflat_jax.run import workdir as workdir_lib

FIGURES = (workdir_lib.CURVES, workdir_lib.CONFUSION, workdir_lib.MISCLASSIFIED)


class EventLog:
    """Writes a run's epoch records and figures as TensorBoard events."""

    def __init__(self, workdir: str, learning_rates: Callable[[int], Sequence[float]]):
        self.directory = workdir_lib.path(workdir, workdir_lib.TENSORBOARD)
        self.learning_rates = learning_rates
        self.writer = None

    def _write(self, epoch: int, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write_event(Event(wall_time=time.time(), step=epoch, **fields))

    def _summary(self, epoch: int, summary) -> None:
        self._write(epoch, summary=summary)

    def write_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (``reporting.epoch_record``), at step = its epoch."""
        from tensorboardX import summary  # Only a writing process needs it.

        epoch = record["epoch"]
        if self.writer is None:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import SessionLog

            workdir_lib.own_directory(self.directory)
            self.writer = EventsWriter(os.path.join(self.directory, "events"))
            self._write(epoch, session_log=SessionLog(status=SessionLog.START))  # The purge.
        rates = list(self.learning_rates(record["step"] - 1))  # The epoch's last update's.
        members = record.get("members", ())
        for k, member in enumerate(members):
            self._scores(f"member_{k}/", member, epoch)
            self._summary(epoch, summary.scalar(f"member_{k}/learning_rate", rates[k]))
        self._scores("ensemble/" if members else "", record, epoch)
        if not members:
            self._summary(epoch, summary.scalar("learning_rate", rates[0]))
        self._summary(epoch, summary.scalar("images_per_sec", record["images_per_sec"]))
        self.writer.flush()

    def _scores(self, prefix: str, record: dict[str, Any], epoch: int) -> None:
        from tensorboardX import summary

        for split in ("train", "validation", "test"):
            for metric in ("loss", "accuracy"):
                if f"{split}_{metric}" in record:
                    value = record[f"{split}_{metric}"]
                    self._summary(epoch, summary.scalar(f"{prefix}{split}/{metric}", value))

    def write_figures(self, workdir: str, epoch: int) -> None:
        """The run's figures (PNG files in ``workdir``) as images at the last epoch."""
        if self.writer is None:
            return
        from PIL import Image
        from tensorboardX import summary

        for name in FIGURES:
            path = workdir_lib.path(workdir, name)
            if workdir_lib.exists(path):
                with Image.open(io.BytesIO(workdir_lib.read_bytes(path))) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tag = name.removesuffix(".png")
                self._summary(epoch, summary.image(tag, pixels, dataformats="HWC"))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
