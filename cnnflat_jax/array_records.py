"""Image datasets as ArrayRecord files: ``python -m cnnflat_jax.array_records``.

Public; the format is ``cnnflat_jax.data.array_records``, whose docstring
``--help`` shows; the command is ``cnnflat_jax.tools.make_records``.
"""

from cnnflat_jax.data import array_records as _implementation
from cnnflat_jax.data.array_records import *  # noqa: F403
from cnnflat_jax.data.array_records import __all__  # noqa: F401
from cnnflat_jax.tools.make_records import main

__doc__ = _implementation.__doc__

if __name__ == "__main__":
    main()
