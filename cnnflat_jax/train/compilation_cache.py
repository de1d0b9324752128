"""JAX's persistent compilation cache, on for every ``train.py`` run unless turned
off: a run whose programs were compiled before loads them from disk instead.

Where: a folder per user and per CPU (``$XDG_CACHE_HOME``, or ``~/.cache``,
then ``cnnflat_jax/xla/<cpu>``). XLA:CPU compiles for the features of the
CPU it runs on and refuses to load a program compiled for other ones, so a
home folder shared by machines of several kinds keeps one cache per kind
rather than one that misses on all. The folder holds at most ``MAX_BYTES``,
the least recently used programs evicted first, and several processes may
share it (the hosts of a multi-process run, the runs of a sweep): JAX then
takes a file lock around every read and write, so no process reads a
program that another is still writing.

``$JAX_COMPILATION_CACHE_DIR`` chooses another folder, which other JAX
programs may use too: there JAX's own settings apply, and its lock only with
a bound (``JAX_COMPILATION_CACHE_MAX_SIZE``, in bytes, for every process
that uses the folder; JAX keeps a bounded folder's bookkeeping only in the
processes that have one).

Off: ``--config.compilation_cache=False``, or ``CNNFLAT_COMPILATION_CACHE=0``
in the environment; and always in a run of several processes on CPUs, whose
programs, loaded from the cache by jax 0.12, hang in their first collective
across processes (compiled afresh, they run).
"""

from __future__ import annotations

import hashlib
import os
import platform

# The environment variable that turns the cache off ("0", "false", "no" or "off").
OFF_VARIABLE = "CNNFLAT_COMPILATION_CACHE"
MAX_BYTES = 4 * 2**30  # The cache's bound: the least recently used programs go first.


def default_directory() -> str:
    """The per-user, per-CPU folder used when ``$JAX_COMPILATION_CACHE_DIR`` is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnnflat_jax", "xla", _cpu_tag())


def _cpu_tag() -> str:
    """A short name for this CPU's kind: its architecture, model and feature flags."""
    identity = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the first processor's model and flags.
            for line in f:
                key = line.partition(":")[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    identity.append(line.strip())
                if not line.strip():
                    break
    except OSError:
        pass
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{digest}"


def enable(on: bool = True) -> str | None:
    """Turns the persistent cache on (see the module's docstring for where), or
    off when ``on`` is False, the environment says off, or the run is several
    processes on CPUs. Call it after ``jax.distributed.initialize`` and before
    the first compilation: it sets JAX's configuration for the whole process.

    Returns:
      The cache folder, or None when it is off.
    """
    import jax

    off = os.environ.get(OFF_VARIABLE, "").strip().lower() in ("0", "false", "no", "off")
    if not on or off or (jax.process_count() > 1 and jax.default_backend() == "cpu"):
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    directory = chosen or default_directory()
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however small or quick to compile: a run has a dozen
    # sub-second ones, and together they cost a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if not chosen:  # The folder is this project's runs' alone: bounded, and locked.
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
