"""TensorBoard event files in ``workdir/tensorboard/``: one point per epoch, figures at the end.

    tensorboard --logdir runs/

Scalars, with the epoch as the step: ``train/loss``, ``train/accuracy``,
``test/...``, ``validation/...`` when a split is held out, ``images_per_sec``
and ``learning_rate`` (of the epoch's last update). A population logs each
member under ``member_K/`` and the ensemble under ``ensemble/``. At the end:
the curves, the confusion matrix and the misclassified grid as images (the
PNG files themselves).

The file is TensorBoard's own format: ``Event`` protocol buffers (the
``tensorboard`` package's message classes) in TFRecord framing, written here.
Writing needs neither TensorFlow nor PyTorch (tensorboardX imports PyTorch
whenever it is installed, which costs a run seconds; Flax's
``flax.metrics.tensorboard`` imports TensorFlow).

A resumed run starts a new event file with a purge at its first epoch (a
``SessionLog.START``), so TensorBoard drops whatever a killed run had logged
from that epoch on: no epoch appears twice. Events are written and flushed
synchronously, before the epoch's checkpoint: a kill after the checkpoint
cannot lose the epoch's points. On object storage, which cannot append, the
object is rewritten whole at each flush.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from cnnflat_jax.run import workdir as workdir_lib

FIGURES = (workdir_lib.CURVES, workdir_lib.CONFUSION, workdir_lib.MISCLASSIFIED)
_FILE_NUMBERS = itertools.count()  # Two writers of one process never share a file.


class EventLog:
    """Writes a run's epoch records and figures as TensorBoard events."""

    def __init__(self, workdir: str, learning_rates: Callable[[int], Sequence[float]]):
        self.directory = workdir_lib.path(workdir, workdir_lib.TENSORBOARD)
        self.learning_rates = learning_rates
        self.path: str | None = None  # The event file, once the first epoch is written.
        self._written = b""  # Everything in the file (an object is rewritten whole).
        self._pending: list[bytes] = []

    def _event(self, epoch: int, **fields) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        event = Event(wall_time=time.time(), step=epoch, **fields)
        self._pending.append(_record(event.SerializeToString()))

    def _scalar(self, epoch: int, tag: str, value: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(epoch, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))

    def write_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (``reporting.epoch_record``), at step = its epoch."""
        epoch = record["epoch"]
        if self.path is None:
            from tensorboard.compat.proto.event_pb2 import SessionLog

            workdir_lib.own_directory(self.directory)
            writer = f"{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}"
            name = f"events.out.tfevents.{int(time.time()):010d}.{writer}"
            self.path = workdir_lib.path(self.directory, name)
            self._event(epoch, file_version="brain.Event:2")
            self._event(epoch, session_log=SessionLog(status=SessionLog.START))  # The purge.
        rates = list(self.learning_rates(record["step"] - 1))  # The epoch's last update's.
        members = record.get("members", ())
        for k, member in enumerate(members):
            self._scores(f"member_{k}/", member, epoch)
            self._scalar(epoch, f"member_{k}/learning_rate", rates[k])
        self._scores("ensemble/" if members else "", record, epoch)
        if not members:
            self._scalar(epoch, "learning_rate", rates[0])
        self._scalar(epoch, "images_per_sec", record["images_per_sec"])
        self._flush()

    def _scores(self, prefix: str, record: dict[str, Any], epoch: int) -> None:
        for split in ("train", "validation", "test"):
            for metric in ("loss", "accuracy"):
                if f"{split}_{metric}" in record:
                    self._scalar(epoch, f"{prefix}{split}/{metric}", record[f"{split}_{metric}"])

    def write_figures(self, workdir: str, epoch: int) -> None:
        """The run's figures (PNG files in ``workdir``) as images at the last epoch."""
        if self.path is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        for name in FIGURES:
            path = workdir_lib.path(workdir, name)
            if workdir_lib.exists(path):
                png = workdir_lib.read_bytes(path)
                image = Summary.Image(encoded_image_string=png, **_png_size(png))
                value = Summary.Value(tag=name.removesuffix(".png"), image=image)
                self._event(epoch, summary=Summary(value=[value]))
        self._flush()

    def _flush(self) -> None:
        new, self._pending = b"".join(self._pending), []
        self._written += new
        if workdir_lib.is_remote(self.path):
            workdir_lib.replace_file(self.path, self._written)
        else:
            workdir_lib.append(self.path, new)


def _record(data: bytes) -> bytes:
    """``data`` in TFRecord framing: its length, the length's masked CRC-32C,
    the data, and the data's masked CRC-32C (all little-endian)."""
    from tensorboard.summary.writer.record_writer import masked_crc32c

    length = struct.pack("<Q", len(data))
    crc = struct.pack("<I", masked_crc32c(length))
    return length + crc + data + struct.pack("<I", masked_crc32c(data))


def _png_size(png: bytes) -> dict[str, int]:
    """A PNG's height, width and TensorBoard colorspace, read from its header
    (IHDR: width and height, then bit depth and colour type)."""
    width, height, _, color_type = struct.unpack(">IIBB", png[16:26])
    colorspace = {0: 1, 4: 2, 2: 3, 6: 4}.get(color_type, 3)  # Gray, gray+alpha, RGB, RGBA.
    return {"height": height, "width": width, "colorspace": colorspace}
