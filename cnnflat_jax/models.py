"""The Flax Linen models built from the ops: Sequential, and the CNN and MLP presets.

Public; implemented in ``cnnflat_jax.nn.models``.
"""

from cnnflat_jax.nn.models import *  # noqa: F403
from cnnflat_jax.nn.models import __all__  # noqa: F401
