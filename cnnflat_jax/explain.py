"""The conv -> ReLU -> pool -> flatten picture: ``python -m cnnflat_jax.explain``.

Public; implemented in ``cnnflat_jax.tools.explain``.
"""

from cnnflat_jax.tools.explain import *  # noqa: F403
from cnnflat_jax.tools.explain import (
    __all__,  # noqa: F401
    main,
)

if __name__ == "__main__":
    main()
