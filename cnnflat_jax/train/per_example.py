"""Per-example gradients with ``vmap(grad(...))``, and the DP-SGD aggregation.

``private_mean`` is the DP-SGD update rule (Abadi et al., 2016): clip each
example's gradient to global L2 norm ``clip_norm``, sum, add Gaussian noise of
std ``noise_multiplier * clip_norm``, divide by the number of examples. This
module does no privacy accounting, so it makes no privacy claim by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "per_example_grads",
    "global_norms",
    "private_mean",
]

PyTree = Any


def per_example_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, batch: PyTree
) -> PyTree:
    """Gradients of ``loss_fn`` for every example of ``batch``, one at a time.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example: the
        leaves of ``example`` are those of ``batch`` without the leading axis.
      params: the parameters, shared by all examples.
      batch: a pytree whose leaves share a leading batch axis ``B``.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``B``: entry
      ``i`` is ``grad(loss_fn)(params, example_i)``.
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def global_norms(grads: PyTree) -> jax.Array:
    """``(B,)`` global L2 norm of each example's gradient (over all leaves)."""
    squares = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)]
    return jnp.sqrt(sum(squares))


def private_mean(
    grads: PyTree,
    mask: jax.Array,
    clip_norm: jax.Array,
    noise_multiplier: jax.Array,
    key: jax.Array,
) -> tuple[PyTree, jax.Array]:
    """Clips per-example gradients, sums the unmasked ones, adds noise, averages.

    Args:
      grads: per-example gradients, leaves ``(B, ...)``.
      mask: ``(B,)``, 1 for real examples and 0 for padding.
      clip_norm: ``C``: each example's gradient is scaled to norm <= C.
      noise_multiplier: ``sigma``: the noise std is ``sigma * C`` per coordinate.
      key: PRNG key for the noise.

    Returns:
      ``((sum_i mask_i clip(g_i) + N(0, sigma^2 C^2)) / sum_i mask_i, norms)``
      with ``norms`` the ``(B,)`` unclipped gradient norms.
    """
    norms = global_norms(grads)
    scale = mask * jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    count = jnp.maximum(jnp.sum(mask), 1.0)
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        (jnp.tensordot(scale, g, axes=1) + noise_multiplier * clip_norm
         * jax.random.normal(k, g.shape[1:], g.dtype)) / count
        for g, k in zip(leaves, keys)
    ]  # fmt: skip
    return jax.tree.unflatten(treedef, noisy), norms
