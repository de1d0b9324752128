"""The shipped configs: ``train.py --config NAME`` or ``--config PATH``.

Each module has ``get_config()``. They are installed with the package, so an
installed ``cnnflat-train`` finds them by name from any directory; in a clone,
``configs/`` at the top is this folder (a link), and ``--config
configs/default.py`` names the same file.
"""

import os

FOLDER = os.path.dirname(os.path.abspath(__file__))
NAMES = tuple(
    sorted(n.removesuffix(".py") for n in os.listdir(FOLDER) if n.endswith(".py") and n[0] != "_")
)


def path(name: str) -> str:
    """The file of the shipped config ``name`` (e.g. "default")."""
    return os.path.join(FOLDER, f"{name}.py")


def resolve(spec: str) -> str:
    """A ``--config`` value with a shipped config's name (``NAME`` or
    ``NAME:ARGUMENT``) turned into that config's file; a path is kept as it is."""
    name, colon, argument = spec.partition(":")
    if name in NAMES and not os.path.exists(name):
        return path(name) + colon + argument
    return spec


def resolve_flags(argv: list[str]) -> list[str]:
    """``argv`` with the value of each ``--config=V`` or ``--config V`` resolved."""
    return [
        resolve(arg) if i and argv[i - 1] == "--config"
        else f"--config={resolve(arg.removeprefix('--config='))}"
        if arg.startswith("--config=") else arg
        for i, arg in enumerate(argv)
    ]  # fmt: skip
