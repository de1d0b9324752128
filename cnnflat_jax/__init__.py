"""cnnflat_jax: CNNs as pure JAX functions, a Flax model and a compiled trainer.

The public API is re-exported here; other names may change.
"""

from cnnflat_jax.models import CNN, MLP, create_model
from cnnflat_jax.ops import avg_pool, conv2d, dense, flatten, max_pool, relu, reorder_flat_kernel
from cnnflat_jax.per_example import per_example_grads

__all__ = [
    "CNN",
    "MLP",
    "avg_pool",
    "conv2d",
    "create_model",
    "dense",
    "flatten",
    "max_pool",
    "per_example_grads",
    "relu",
    "reorder_flat_kernel",
]
