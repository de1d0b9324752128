"""The models as ``flax.nnx`` modules, from the same ops and layer specs as the Linen ones.

Public; implemented in ``cnnflat_jax.nn.nnx_models``.
"""

from cnnflat_jax.nn.nnx_models import *  # noqa: F403
from cnnflat_jax.nn.nnx_models import __all__  # noqa: F401
