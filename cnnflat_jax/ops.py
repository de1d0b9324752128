"""The pure layer functions: conv2d, relu, max_pool, avg_pool, flatten, dense, ...

Public; implemented in ``cnnflat_jax.nn.ops``.
"""

from cnnflat_jax.nn.ops import *  # noqa: F403
from cnnflat_jax.nn.ops import __all__  # noqa: F401
