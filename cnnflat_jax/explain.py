"""The conv -> ReLU -> pool -> flatten picture: ``python -m cnnflat_jax.explain``.

Public; implemented in ``cnnflat_jax.tools.explain``, whose docstring ``--help`` shows.
"""

from cnnflat_jax.tools import explain as _implementation
from cnnflat_jax.tools.explain import *  # noqa: F403
from cnnflat_jax.tools.explain import __all__  # noqa: F401

__doc__ = _implementation.__doc__

if __name__ == "__main__":
    _implementation.main()
