"""How much memory a run's training needs, estimated from shapes before anything compiles.

The estimate is a floor, not XLA's exact figure: float32 activations kept
for the backward pass and their gradients, the host dispatch of uint8
batches, eval's activations, and the parameters with their gradients and
two optimizer moments. ``config.check_data`` refuses a config whose floor
already exceeds the memory there is, so that it fails in one line instead
of growing past the machine's memory.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

_FLOAT32 = 4


def needs(
    variables: Any,
    image_shape: tuple[int, ...],
    *,
    batch_size: int,
    eval_batch_size: int,
    steps_per_dispatch: int,
    members: int,
) -> dict[str, int]:
    """Bytes a run needs, by the setting they grow with.

    Args:
      variables: ``jax.eval_shape`` of the model's ``init`` on one example,
        every collection (``params``, and the layer outputs it sows as
        ``intermediates``).
      image_shape: one example's ``(H, W, C)``.

    Returns:
      ``{"batch_size": training activations and batches, "eval_batch_size":
      eval's activations, "model": parameters, gradients, optimizer state}``.
    """
    per_example = sum(
        math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(variables.get("intermediates", {}))
    )
    image = math.prod(image_shape)
    parameters = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    return {
        "batch_size": members * batch_size * (2 * per_example + image) * _FLOAT32
        + steps_per_dispatch * batch_size * image,
        "eval_batch_size": members * eval_batch_size * (per_example + image) * _FLOAT32,
        "model": members * 4 * parameters * _FLOAT32,
    }


def available() -> int:
    """Bytes of memory the run's arrays can use: the first device's limit
    where it reports one (GPU, TPU), else the host's physical memory (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
