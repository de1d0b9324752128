"""A finished run as a jax.export artifact: ``python -m cnnflat_jax.export``.

Public; implemented in ``cnnflat_jax.tools.export``, whose docstring ``--help`` shows.
"""

from cnnflat_jax.tools import export as _implementation
from cnnflat_jax.tools.export import *  # noqa: F403
from cnnflat_jax.tools.export import __all__  # noqa: F401

__doc__ = _implementation.__doc__

if __name__ == "__main__":
    _implementation.main()
