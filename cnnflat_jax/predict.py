"""Classifies image files with an export: ``python -m cnnflat_jax.predict``.

Public; implemented in ``cnnflat_jax.tools.predict``.
"""

import sys

from cnnflat_jax.tools.predict import *  # noqa: F403
from cnnflat_jax.tools.predict import (
    __all__,  # noqa: F401
    main,
)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
