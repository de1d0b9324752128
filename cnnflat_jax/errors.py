"""``Error``: the one base class of the errors that end a command with one ``error:`` line."""


class Error(Exception):
    """A fault the user can mend, told in one line: what is wrong, where, and what to do.

    ``train.py`` and the ``python -m cnnflat_jax.*`` commands catch this class
    and print ``error: MESSAGE``. Each subclass also derives from the builtin
    error it refines (``ValueError``, ``OSError``, ...), so code that catches
    those still catches it.
    """
