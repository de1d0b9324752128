"""Examples -> batches: epoch plans, host gathering, eval padding, the validation split.

An epoch's data order is one permutation per epoch (``fold_in(key, epoch)``),
padded to whole batches with masked-out slots, so the last partial batch is
trained on and not dropped. The plan is global (every process's examples);
each process gathers its own columns of every batch on the host. See
``shards`` for how the examples are cut into data shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from cnnflat_jax.data import input_pipeline, shards
from cnnflat_jax.data.examples import Dispatch
from cnnflat_jax.data.input_pipeline import Examples


class Plan(NamedTuple):
    """An epoch's example order: ``indices`` ``(dispatches, steps, [K,] batch)``
    into the concatenated shards, and ``mask`` ``(dispatches, steps, batch)``,
    1 for an example and 0 for padding. A step whose mask is all 0 is skipped."""

    indices: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        """The number of dispatches."""
        return len(self.indices)

    def steps(self, dispatches: int | slice = slice(None)) -> int:
        """How many steps ``dispatches`` (default: all) train, skipped steps not counted."""
        return int(np.any(self.mask[dispatches] > 0, axis=-1).sum())


def _shard_list(shard_sizes: int | Sequence[int]) -> list[int]:
    """Shard sizes as a list; an int is one shard."""
    return [shard_sizes] if isinstance(shard_sizes, int) else list(shard_sizes)


def steps_per_epoch(shard_sizes: int | Sequence[int], batch_size: int) -> int:
    """Steps for every example of the largest shard (see ``epoch_plan``)."""
    sizes = _shard_list(shard_sizes)
    return -(-max(sizes) // (batch_size // len(sizes)))


def epoch_plan(
    key: jax.Array,
    epoch: int,
    shard_sizes: int | Sequence[int],
    batch_size: int,
    steps_per_dispatch: int,
) -> Plan:
    """The epoch's example order as ``(dispatches, steps_per_dispatch, batch)``.

    The examples are ``len(shard_sizes)`` contiguous shards (an int is one
    shard); shard ``s`` fills batch columns ``[s * b, (s + 1) * b)`` with
    ``b = batch_size / len(shard_sizes)``, in a permutation drawn from
    ``fold_in(key, epoch)`` (one shard) or ``fold_in(fold_in(key, epoch), s)``.

    Returns:
      ``(indices, mask)``: indices into the concatenated shards, padded with
      each shard's first index and mask 0 up to whole batches and whole
      dispatches. Steps whose mask is all zero are skipped.
    """
    sizes = _shard_list(shard_sizes)
    per_shard = batch_size // len(sizes)
    steps = steps_per_epoch(sizes, batch_size)
    steps = -(-steps // steps_per_dispatch) * steps_per_dispatch
    epoch_key = jax.random.fold_in(key, epoch)
    indices = np.zeros((len(sizes), steps * per_shard), np.int32)
    mask = np.zeros((len(sizes), steps * per_shard), np.float32)
    for s, (start, size) in enumerate(zip(np.cumsum([0, *sizes]), sizes)):
        shard_key = epoch_key if len(sizes) == 1 else jax.random.fold_in(epoch_key, s)
        indices[s] = start
        indices[s, :size] += np.asarray(jax.random.permutation(shard_key, size))
        mask[s, :size] = 1.0
    shape = (steps // steps_per_dispatch, steps_per_dispatch, batch_size)

    def batches(x):  # (shard, step * per_shard) -> (dispatch, step, shard * per_shard)
        x = x.reshape(len(sizes), steps, per_shard).transpose(1, 0, 2)
        return x.reshape(shape)

    return Plan(batches(indices), batches(mask))


def members_plan(keys: Sequence[jax.Array], epoch: int, *args) -> Plan:
    """``epoch_plan`` for one data-order key, or one per member stacked as
    ``(dispatches, steps, K, batch)`` indices with one shared mask.

    Every member's plan pads the same example count, so the masks are equal.
    """
    plans = [epoch_plan(key, epoch, *args) for key in keys]
    if len(plans) == 1:
        return plans[0]
    return Plan(np.stack([plan.indices for plan in plans], axis=2), plans[0].mask)


def gather_batches(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Batches gathered from arrays on the host: ``(steps, [K,] batch, ...)``."""
    return {"image": images[indices], "label": labels[indices], "mask": mask}


def process_columns(batch_size: int) -> slice:
    """The columns of a global batch that this process supplies."""
    per_process = batch_size // jax.process_count()
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


@dataclasses.dataclass(frozen=True)
class TrainData:
    """This process's training examples and where they sit in the global order.

    ``shard_sizes`` are the training sizes of all data shards (every
    process's); this process's shards start at ``offset`` in the
    concatenated order that ``epoch_plan`` indexes.
    """

    examples: Examples
    shard_sizes: list[int]
    offset: int

    def batches(self, indices: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """This process's columns of one dispatch of a global plan, read:
        ``(steps, [K,] batch, ...)``."""
        columns = process_columns(indices.shape[-1])
        images, labels = self.examples.read(indices[..., columns] - self.offset)
        return {"image": images, "label": labels, "mask": mask[..., columns]}

    def stream(self, plan: Plan, start: int, state: dict | None) -> Iterator[Dispatch]:
        """The plan's dispatches from ``start`` on, read as the examples' kind
        reads (``examples.Arrays.stream``, ``array_records.Records.stream``).

        ``state`` is the iterator's ``get_state()`` after dispatch ``start - 1``
        (None at the epoch's start).
        """

        def read_dispatch(d: int) -> Dispatch:
            return self.batches(plan.indices[d], plan.mask[d])

        return self.examples.stream(read_dispatch, len(plan), start, state)


def split_validation(
    data: input_pipeline.Dataset, num_validation: int, data_shards: int
) -> tuple[TrainData, tuple[np.ndarray, np.ndarray] | None]:
    """Holds out the last ``num_validation / data_shards`` examples of every shard.

    ``config.check_data`` has checked that the count splits over the shards
    and leaves training examples.

    Returns:
      ``(TrainData, (images, labels) of the validation part, or None)``.
    """
    examples = data.train
    per_shard = num_validation // data_shards
    bounds = shards.shard_bounds(data.train_total, data_shards)
    sizes = np.diff(bounds) - per_shard
    own = shards.process_shards(data_shards)
    starts = bounds[own.start : own.stop] - bounds[own.start]
    keep = np.concatenate([np.arange(start, start + sizes[s]) for start, s in zip(starts, own)])
    held = np.setdiff1d(np.arange(len(examples)), keep)
    offset = int(sizes[: own.start].sum())
    train = TrainData(examples.take(keep), sizes.tolist(), offset)
    return train, examples.read(held) if per_shard else None


def eval_arrays(
    images: np.ndarray, labels: np.ndarray, batch_size: int, num_batches: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads a split to whole batches (at least ``num_batches``).

    Returns:
      ``(images, labels, mask)`` shaped ``(batches, batch_size, ...)``; the
      padding has mask 0.
    """
    n = len(images)
    pad = max(-(-n // batch_size), num_batches) * batch_size - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (
        images.reshape(-1, batch_size, *images.shape[1:]),
        labels.reshape(-1, batch_size),
        mask.reshape(-1, batch_size),
    )
