"""Pre-flight check of a config on a Cloud TPU slice: ``python -m cnnflat_jax.tpu_check``.

Public; implemented in ``cnnflat_jax.tools.tpu_check``, whose docstring ``--help`` shows.
"""

from cnnflat_jax.tools import tpu_check as _implementation
from cnnflat_jax.tools.tpu_check import *  # noqa: F403
from cnnflat_jax.tools.tpu_check import __all__  # noqa: F401

__doc__ = _implementation.__doc__

if __name__ == "__main__":
    _implementation.main()
