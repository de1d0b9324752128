"""cnnflat_jax: CNNs as pure JAX functions, Flax models and a compiled trainer.

The public API is re-exported here; other names may change. The names load
on first use, so ``python -m cnnflat_jax.predict`` (which serves an exported
model) imports neither Flax nor the model code.
"""

import importlib
import os

# gs:// paths go through etils.epath's fsspec backend (gcsfs), as Orbax's own
# do, not through TensorFlow's file system: TensorFlow is imported only to read
# TFDS data. EPATH_USE_TF=true in the environment chooses TensorFlow's instead.
os.environ.setdefault("EPATH_USE_TF", "false")

_HOMES = {
    "Error": "errors",
    "load_run": "run.trained_run",
    "CNN": "models",
    "MLP": "models",
    "Sequential": "models",
    "create_model": "models",
    "avg_pool": "ops",
    "conv2d": "ops",
    "dense": "ops",
    "dropout": "ops",
    "flatten": "ops",
    "global_avg_pool": "ops",
    "max_pool": "ops",
    "relu": "ops",
    "reorder_flat_kernel": "ops",
    "per_example_grads": "per_example",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"cnnflat_jax.{_HOMES[name]}"), name)
    try:  # A submodule: ``import cnnflat_jax; cnnflat_jax.ops.relu(...)``.
        return importlib.import_module(f"cnnflat_jax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"cnnflat_jax.{name}":
            raise
    raise AttributeError(f"module 'cnnflat_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
