"""cnnflat_jax: CNNs as pure JAX functions, Flax models and a compiled trainer.

The public API is re-exported here; other names may change.
"""

from cnnflat_jax.models import CNN, MLP, Sequential, create_model
from cnnflat_jax.ops import (
    avg_pool,
    conv2d,
    dense,
    dropout,
    flatten,
    global_avg_pool,
    max_pool,
    relu,
    reorder_flat_kernel,
)
from cnnflat_jax.per_example import per_example_grads

__all__ = [
    "CNN",
    "MLP",
    "Sequential",
    "avg_pool",
    "conv2d",
    "create_model",
    "dense",
    "dropout",
    "flatten",
    "global_avg_pool",
    "max_pool",
    "per_example_grads",
    "relu",
    "reorder_flat_kernel",
]
