"""Trains a CNN: ``python train.py --config configs/default.py --workdir runs/x``.

The command is ``cnnflat_jax/tools/train_command.py`` (installed as
``cnnflat-train``); its docstring lists the flags.
"""

from cnnflat_jax.tools import train_command

if __name__ == "__main__":
    train_command.main()
