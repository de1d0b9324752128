"""The train command: ``python train.py`` in a clone, ``cnnflat-train`` once installed.

    python train.py --config configs/default.py --workdir runs/x
    cnnflat-train --config default --workdir runs/x

``--config`` takes a config file's path, or a shipped config's name
(``cnnflat_jax/configs``: default, fast, mnist, cifar10, smoke, ...); the
default is the shipped ``default``. Override any config field with
``--config.FIELD=VALUE``; unknown fields and bad values are rejected with one
``error:`` line before any work. Rerunning with the same ``--workdir``
resumes from its latest checkpoint. Several processes (hosts):
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on each
(or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` variables); on a Cloud TPU slice,
``--coordinator_address=auto`` finds the others itself.
"""

import atexit
import logging as std_logging
import os
import sys

_exit_code: list[int] = []  # The command's exit code, once it has ended.


def _end_without_teardown() -> None:
    """Once the command has ended and every other exit function has run (the
    checkpoints', JAX's), ends the process with its exit code, skipping the
    interpreter's teardown: freeing thousands of modules and XLA's client
    costs a run 0.4 s and writes nothing."""
    if _exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code[0])


# Registered before any other exit function, so it runs after all of them.
atexit.register(_end_without_teardown)

from cnnflat_jax.run import signals
from cnnflat_jax.tools import command

# Before JAX loads: a signal while train.py starts up ends it in one line, never
# a KeyboardInterrupt inside an import or an XLA callback.
signals.exit_on_signals("starting up; nothing new was saved")

from absl import app, flags, logging
from ml_collections import config_flags

from cnnflat_jax import config as config_lib
from cnnflat_jax import configs

# JAX, Orbax and the trainer are imported by ``run``: ``--help`` and a bad flag
# or config need none of them, and answer in a fraction of a second.


# A broken default config file or an unknown --config.FIELD fails while the
# flag is defined or parsed: say so in one line, not a traceback.
with command.config_errors(sys.argv):
    _CONFIG = config_flags.DEFINE_config_file(
        "config", configs.path("default"), "A config file, or a shipped config's name.",
        lock_config=True,
    )  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for metrics and params.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 in a multi-process run; 'auto' on TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0 .. N - 1.")


def main() -> None:
    """The command line (``train.py``, ``cnnflat-train``)."""
    # ``--help`` lists the main module's key flags: this command's, whatever its script.
    for flag in (_CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag.name])
    try:
        app.run(run, flags_parser=command.parse_config_flags)
    except SystemExit as e:  # Python prints a message given as the code, and exits 1.
        _exit_code.append(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise


def run(argv):
    import jax

    from cnnflat_jax.train import compilation_cache, sharding

    if len(argv) > 1:
        command.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    # JAX logs, at INFO, each backend it finds missing (libtpu on every CPU run).
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    with command.config_errors(sys.argv):
        config = _CONFIG.value
        config.keys()  # A config file that failed to load raises on first use.
    with command.one_line_failures():  # The fields used before the whole config is checked.
        config_lib.check_field(config, "compilation_cache")
        config_lib.check_field(config, "peer_timeout_sec")
    with command.one_line_failures():
        sharding.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, config.peer_timeout_sec
        )
    compilation_cache.enable(config.compilation_cache)
    with command.one_line_failures():  # Before the trainer's modules load: answered at once.
        config_lib.check(config)
    from cnnflat_jax.run import checkpoints, lost_peer, trainer

    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # Process 0 reports for all.
    if jax.process_count() > 1:  # SIGTERM is JAX's (a preemption sync point); SIGINT stops.
        lost_peer.filter_stderr()
        signals.exit_on_signals(
            "running with several processes; stopped without a new checkpoint (the ones "
            "written before are intact: rerun the same command to resume)"
        )
    with command.one_line_failures():
        try:
            trainer.train_and_evaluate(config, _WORKDIR.value)
            signals.exit_on_signals("exiting; the run had ended and its outputs are complete")
        except checkpoints.CheckpointWriteError as e:
            # Orbax's failed writes leave tasks that complain when the
            # interpreter finalises them: the error is said, so leave without.
            command.say_error(str(e))
            os._exit(1)
        except OSError as e:  # A full disk, a read-only or unusable workdir, a permission.
            command.fail(os_error(e))
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            # A collective failed: a peer is gone. Leave at once: JAX's shutdown at exit
            # would wait for it.
            command.say_error(f"{lost_peer.LOST_PEER} ({str(e).splitlines()[0]})")
            os._exit(1)


def os_error(error: OSError) -> str:
    """One line for an OS error: what failed, on which path."""
    path = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{path}; the last finished checkpoint, if any, is intact"
