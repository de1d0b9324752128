"""Data shards: which examples each process loads.

Each process loads only its own part of a split: the split is cut into
``data_shards`` contiguous shards (``shard_bounds``), each process holds an
equal, contiguous run of them, and every global batch takes
``batch_size / data_shards`` examples from each shard. The data order thus
depends on ``data_shards`` (by default the process count), not on how many
processes or devices run it: a one-process run with ``data_shards=2`` sees
exactly the batches of a two-process run.
"""

from __future__ import annotations

import jax
import numpy as np


def shard_bounds(total: int, count: int) -> np.ndarray:
    """Start of each of ``count`` near-equal contiguous shards of ``total``, and the end."""
    return np.array([i * total // count for i in range(count + 1)])


def process_shards(data_shards: int) -> range:
    """The data shards this process loads: an equal, contiguous run of them."""
    processes = jax.process_count()
    if data_shards % processes:
        raise ValueError(
            f"data_shards={data_shards} is not a multiple of the {processes} processes"
        )
    per_process = data_shards // processes
    return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
