"""Strict JAX settings for the whole suite, set before any computation."""

import os

import jax

# Keras (an interop test dependency) runs on JAX, so no TensorFlow is needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

# Several CPU devices so that sharded code paths run on a laptop or CI.
jax.config.update("jax_num_cpu_devices", 8)
# A silent broadcast of mismatched ranks is a bug in our ops: make it raise.
jax.config.update("jax_numpy_rank_promotion", "raise")
