"""Trains a CNN: ``python train.py --config configs/default.py --workdir runs/x``.

Override any config field with ``--config.FIELD=VALUE``; unknown fields are
rejected.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from cnnflat_jax import idx, input_pipeline, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Training config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for metrics and params.")


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
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (trainer.ConfigError, input_pipeline.DatasetError, idx.IdxError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
