"""Classifies image files with a run's export: ``python -m cnnflat_jax.predict``.

Public; implemented in ``cnnflat_jax.tools.predict``, whose docstring ``--help`` shows.
"""

import sys

from cnnflat_jax.tools import predict as _implementation
from cnnflat_jax.tools.predict import *  # noqa: F403
from cnnflat_jax.tools.predict import __all__  # noqa: F401

__doc__ = _implementation.__doc__

if __name__ == "__main__":
    sys.exit(_implementation.main(sys.argv))
