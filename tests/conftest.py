"""Strict JAX settings for the whole suite, set before any computation."""

import atexit
import os
import shutil
import tempfile

# The suite runs on CPUs. Where libtpu is installed (the newest stack, for the TPU
# pre-flight tests), JAX would otherwise try a TPU backend in every process and
# print libtpu's start-up complaints on stderr; compiling for a TPU topology
# (tests/test_tpu_check.py) works either way.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist's workers each load libtpu to compile for TPU topologies; by
# default libtpu allows one process per machine (a lock file in /tmp), and
# the test that runs tpu_check in a subprocess has loaded it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache for the session, shared by this process (and
# pytest-xdist's workers, which inherit the variables) and every train.py, export
# or predict it starts: a program compiled once loads after. Bounded in every
# process, so that JAX locks every read and write of it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnflat_jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2**32)
    # The processes started here cache every program, as train.py does (the
    # benchmarks' workers train the same model for several seeds).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import gcs_emulator  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# Keras (an interop test dependency) runs on JAX, so no TensorFlow is needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

# Several CPU devices so that sharded code paths run on a laptop or CI.
jax.config.update("jax_num_cpu_devices", 8)
# This process compiles thousands of small test programs, which other processes
# seldom share: only the slow ones (JAX's default) are worth a file.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# A silent broadcast of mismatched ranks is a bug in our ops: make it raise.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator on 127.0.0.1 for the session, its clients
    pointed at it in this process (``gcs.env`` for subprocesses)."""
    if gcs_emulator.binary() is None:
        pytest.skip("fake-gcs-server has no binary for this platform")
    emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp("gcs") / "server.log"))
    saved = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    yield emulator
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    emulator.stop()
