"""Trains a CNN: ``python train.py --config configs/default.py --workdir runs/x``.

Override any config field with ``--config.FIELD=VALUE``; unknown fields and
bad values are rejected with one ``error:`` line before any work. Rerunning
with the same ``--workdir`` resumes from its latest checkpoint. Several
processes (hosts): ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` on each (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` variables); on a Cloud TPU slice,
``--coordinator_address=auto`` finds the others itself.
"""

import logging as std_logging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cnnflat_jax import errors
from cnnflat_jax.config import one_line_errors
from cnnflat_jax.run import checkpoints, run_state, trainer
from cnnflat_jax.train import sharding

# A broken default config file or an unknown --config.FIELD fails while the
# flag is defined or parsed: say so in one line, not a traceback.
with one_line_errors(sys.argv):
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/default.py", "Training config file.", lock_config=True
    )
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for metrics and params.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 in a multi-process run; 'auto' on TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0 .. N - 1.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with one ``error:`` line for a bad flag or config file."""
    with one_line_errors(argv):
        return flags.FLAGS(argv)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    # JAX logs, at INFO, each backend it finds missing (libtpu on every CPU run).
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    with one_line_errors(sys.argv):
        config = _CONFIG.value
        config.keys()  # A config file that failed to load raises on first use.
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # Process 0 reports for all.
    try:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except run_state.Preempted as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save yet.
        print("interrupted (SIGINT) before training began; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except errors.Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, checkpoints.CheckpointWriteError):
            # Orbax's failed writes leave tasks that complain when the
            # interpreter finalises them: the error is said, so leave without.
            os._exit(1)
        sys.exit(1)
    except OSError as e:  # A full disk, a read-only or unusable workdir, a permission.
        sys.exit(f"error: {os_error(e)}")


def os_error(error: OSError) -> str:
    """One line for an OS error: what failed, on which path."""
    path = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{path}; the last finished checkpoint, if any, is intact"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
