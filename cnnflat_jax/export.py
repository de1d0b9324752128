"""A finished run as a jax.export artifact: ``python -m cnnflat_jax.export``.

Public; implemented in ``cnnflat_jax.tools.export``.
"""

from cnnflat_jax.tools.export import *  # noqa: F403
from cnnflat_jax.tools.export import (
    __all__,  # noqa: F401
    main,
)

if __name__ == "__main__":
    main()
