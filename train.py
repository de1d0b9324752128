"""Trains a CNN: ``python train.py --config configs/default.py --workdir runs/x``.

Override any config field with ``--config.FIELD=VALUE``; unknown fields are
rejected. Rerunning with the same ``--workdir`` resumes from its latest
checkpoint. Several processes (hosts): ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on each (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` variables); on a Cloud TPU slice,
``--coordinator_address=auto`` finds the others itself.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cnnflat_jax import checkpoints, idx, input_pipeline, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Training config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for metrics and params.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 in a multi-process run; 'auto' on TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0 .. N - 1.")


# What a shell reports for a process ended by SIGTERM: schedulers restart it.
PREEMPTED_EXIT_CODE = 128 + 15


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line error for an unknown --config.FIELD."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections wraps a KeyError (with a "Did you mean" hint) in AttributeError.
        while e.args and isinstance(e.args[0], Exception):
            e = e.args[0]
        detail = str(e.args[0] if e.args else e)
        sys.exit(f"error: unknown config key in a --config override: {detail}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # Process 0 reports for all.
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.Preempted as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (
        trainer.ConfigError,
        trainer.NonFiniteLossError,
        checkpoints.IncompatibleCheckpointError,
        input_pipeline.DatasetError,
        idx.IdxError,
    ) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
