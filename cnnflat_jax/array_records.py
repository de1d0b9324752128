"""Image datasets as ArrayRecord files: ``python -m cnnflat_jax.array_records``.

Public; implemented in ``cnnflat_jax.data.array_records``.
"""

from cnnflat_jax.data.array_records import *  # noqa: F403
from cnnflat_jax.data.array_records import __all__  # noqa: F401
from cnnflat_jax.tools.make_records import main

if __name__ == "__main__":
    main()
