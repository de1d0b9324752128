"""Models to and from Keras 3 and PyTorch, flatten order included.

Public; implemented in ``cnnflat_jax.tools.interop``.
"""

from cnnflat_jax.tools.interop import *  # noqa: F403
from cnnflat_jax.tools.interop import __all__  # noqa: F401
