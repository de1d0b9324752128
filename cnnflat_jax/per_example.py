"""Per-example gradients and the DP-SGD aggregation.

Public; implemented in ``cnnflat_jax.train.per_example``.
"""

from cnnflat_jax.train.per_example import *  # noqa: F403
from cnnflat_jax.train.per_example import __all__  # noqa: F401
