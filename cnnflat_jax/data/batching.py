"""Examples -> batches: epoch plans, host gathering, eval padding, the validation split.

An epoch's data order is one permutation per epoch (``fold_in(key, epoch)``),
padded to whole batches with masked-out slots, so the last partial batch is
trained on and not dropped. The plan is global (every process's examples);
each process gathers its own columns of every batch on the host. See
``shards`` for how the examples are cut into data shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from cnnflat_jax.data import array_records, input_pipeline, shards

Plan = tuple[np.ndarray, np.ndarray]  # (indices, mask), (dispatches, steps, [K,] batch).


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

    return batches(indices), batches(mask)


def members_plan(keys: Sequence[jax.Array], epoch: int, *args) -> Plan:
    """``epoch_plan`` for one data-order key, or one per member stacked as
    ``(dispatches, steps, K, batch)`` indices with one shared mask.

    Every member's plan pads the same example count, so the masks are equal.
    """
    plans = [epoch_plan(key, epoch, *args) for key in keys]
    if len(plans) == 1:
        return plans[0]
    return np.stack([indices for indices, _ in plans], axis=2), plans[0][1]


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Examples held in host memory; ``array_records.Records`` is the streamed kind."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray | slice) -> Arrays:
        return Arrays(self.images[positions], self.labels[positions])

    def read(self, positions: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        return self.images[positions], self.labels[positions]


Examples = Arrays | array_records.Records


def gather_batches(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Batches gathered from arrays on the host: ``(steps, [K,] batch, ...)``."""
    return {"image": images[indices], "label": labels[indices], "mask": mask}


# Dispatches that Grain reads ahead of the training loop, in a background thread.
PREFETCH_DISPATCHES = 2


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

    def stream(self, plan: Plan, state: dict | None = None):
        """The plan's dispatches as a Grain iterator that reads
        ``PREFETCH_DISPATCHES`` ahead, or None when the examples are in memory
        (``batches`` gathers each dispatch when it is due).

        ``iterator.get_state()`` after dispatch ``d`` is the state to pass
        as ``state`` to go on from dispatch ``d + 1``.
        """
        if isinstance(self.examples, Arrays):
            return None
        import grain

        indices, mask = plan
        dispatches = grain.MapDataset.range(len(indices)).map(
            lambda d: self.batches(indices[d], mask[d])
        )
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_DISPATCHES)
        iterator = iter(dispatches.to_iter_dataset(options))
        if state is not None:
            iterator.set_state(state)
        return iterator


def split_validation(
    data: input_pipeline.Dataset, num_validation: int, data_shards: int
) -> tuple[TrainData, tuple[np.ndarray, np.ndarray] | None]:
    """Holds out the last ``num_validation / data_shards`` examples of every shard.

    ``config.check_data`` has checked that the count splits over the shards
    and leaves training examples.

    Returns:
      ``(TrainData, (images, labels) of the validation part, or None)``.
    """
    examples = data.train_records or Arrays(data.train_images, data.train_labels)
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
