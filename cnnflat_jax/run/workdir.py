"""The run directory (``--workdir``): the name of every file in it, read and written safely.

    W/config.json           the run's config: its identity (``read_config``)
    W/metrics.jsonl         one record per epoch (``reporting.MetricsLog``)
    W/checkpoints/          Orbax run checkpoints, for an exact resume
    W/damaged_checkpoints/  checkpoints that failed to restore, set aside
    W/final_params/         the trained parameters (Orbax; a population's stacked)
    W/data.json             what the model takes and gives (``read_data_info``)
    W/tensorboard/          TensorBoard event files
    W/curves.png, confusion.png, misclassified.png, hardest_examples.{png,json}
    W/export/model.jax, W/export/classes.json   ``python -m cnnflat_jax.export``
    W/.lock                 held while a run uses the directory

Every file a run writes here goes through ``replace_file`` or
``append``, which never follow a symbolic link: whoever can write into a
shared run directory cannot make a training job write anywhere else. A link
where the run expects one of its own files is a one-line ``RunError``.

A workdir may be a local directory or a ``gs://bucket/path`` (read and
written through ``etils.epath``; its lock is ``lock.py``'s). Object storage
has no links, no directories and no appends: an object is replaced whole by
one upload, which is what ``replace_file`` needs, and ``append``
rewrites the object. Every other
module reads and tests the run's files through this one (``read_text``,
``exists``, ``is_directory``, from ``cnnflat_jax.paths``), so none of them
tells the two apart.

Only the standard library is imported at the top, so ``predict`` can name
the export's files without loading Flax or the models.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from cnnflat_jax import paths
from cnnflat_jax.errors import Error
from cnnflat_jax.paths import absolute as absolute  # Re-exported: the run's files' tests.
from cnnflat_jax.paths import exists as exists
from cnnflat_jax.paths import is_directory as is_directory
from cnnflat_jax.paths import is_remote as is_remote
from cnnflat_jax.paths import list_names as list_names

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"
FINAL_PARAMS = "final_params"
DATA_INFO = "data.json"
TENSORBOARD = "tensorboard"
CURVES = "curves.png"
CONFUSION = "confusion.png"
MISCLASSIFIED = "misclassified.png"
HARDEST_FIGURE = "hardest_examples.png"
HARDEST_LIST = "hardest_examples.json"
LOCK = ".lock"
EXPORT = "export"
EXPORT_MODEL = os.path.join(EXPORT, "model.jax")
EXPORT_CLASSES = os.path.join(EXPORT, "classes.json")
# Everything above: the names a run and its tools write in a workdir.
NAMES = (
    CONFIG, METRICS, CHECKPOINTS, DAMAGED_CHECKPOINTS, FINAL_PARAMS, DATA_INFO, TENSORBOARD,
    CURVES, CONFUSION, MISCLASSIFIED, HARDEST_FIGURE, HARDEST_LIST, LOCK, EXPORT, EXPORT_MODEL,
    EXPORT_CLASSES,
)  # fmt: skip


class RunError(Error, RuntimeError):
    """The workdir cannot hold this run (in use, another run's, no intact
    checkpoint), or is not the finished run a tool needs."""


# Characters that Orbax's deepest paths add to a workdir's (a checkpoint's
# temporary directory, its OCDBT process directory and data files), with room.
_DEEPEST_SUFFIX = 256


def read_bytes(target: str | os.PathLike) -> bytes:
    """The content of ``target``, never read through a link.

    Raises:
      FileNotFoundError: there is no such file.
      RunError: ``target`` is a symbolic link.
    """
    if is_remote(target):
        with paths.named(target):
            return paths.remote(target).read_bytes()
    descriptor = os.open(not_a_link(target), os.O_RDONLY | NO_FOLLOW)
    with os.fdopen(descriptor, "rb") as f:
        return f.read()


def read_text(target: str | os.PathLike) -> str:
    """``read_bytes`` as UTF-8 text; undecodable bytes become U+FFFD."""
    return read_bytes(target).decode(errors="replace")


def check_path_room(workdir: str | os.PathLike) -> None:
    """Refuses, before any work, a workdir whose path leaves the checkpoints no room.

    Raises:
      RunError: the path plus what Orbax adds would pass the system's limit.
    """
    if is_remote(workdir):
        return  # An object name may hold 1,024 bytes; no run comes near it.
    absolute = os.path.abspath(workdir)
    limit = os.pathconf("/", "PC_PATH_MAX")
    if len(absolute) + _DEEPEST_SUFFIX > limit:
        raise RunError(
            f"the workdir's path is {len(absolute)} characters; its checkpoints need about "
            f"{_DEEPEST_SUFFIX} more, and paths here may have at most {limit}: use a shorter "
            "--workdir"
        )


def path(workdir: str | os.PathLike, name: str) -> str:
    """``workdir``'s file or directory ``name`` (one of this module's names)."""
    return paths.join(workdir, name)


def explain_figure(index: int) -> str:
    """The name of ``python -m cnnflat_jax.explain``'s figure of test image ``index``."""
    return f"explain_{index}.png"


# Never through a symbolic link, and never inherited by a child process.
NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def not_a_link(target: str | os.PathLike) -> str:
    """``target`` as a string, refused if it is a symbolic link: the run writes
    only files and directories it made itself.

    Raises:
      RunError: ``target`` is a symbolic link.
    """
    target = os.fspath(target)
    if not is_remote(target) and os.path.islink(target):
        raise RunError(
            f"{target} is a symbolic link; a run writes only its own files in its workdir "
            "(remove the link, or use another --workdir)"
        )
    return target


def check_no_links(workdir: str | os.PathLike) -> None:
    """Refuses a workdir where any of the run's own files or directories is a
    symbolic link, before the run spends any work.

    Raises:
      RunError: naming the first such link.
    """
    for name in NAMES:
        not_a_link(path(workdir, name))


def replace_file(target: str | os.PathLike, content: bytes | str) -> None:
    """Writes ``content`` to ``target`` whole or not at all, never through a link.

    It goes to a new ``target.tmp`` (created exclusively, so a link planted
    there is removed, not followed) and is renamed over ``target``, which
    replaces the name itself, whatever it was.

    On object storage, one upload replaces the object whole or not at all.

    Raises:
      RunError: ``target`` is a symbolic link.
    """
    content = content.encode() if isinstance(content, str) else content
    if is_remote(target):
        paths.remote(target).write_bytes(content)
        return
    target = not_a_link(target)
    temporary = target + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # Removes a link itself, never its target.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666)
    with os.fdopen(descriptor, "wb") as f:
        f.write(content)
    os.replace(temporary, target)


def append(target: str | os.PathLike, content: bytes | str) -> None:
    """Appends ``content`` to ``target`` (created if missing), never through a link.

    An object cannot be appended to: it is rewritten whole with ``content`` added.

    Raises:
      RunError: ``target`` is a symbolic link.
    """
    content = content.encode() if isinstance(content, str) else content
    if is_remote(target):
        before = read_bytes(target) if exists(target) else b""
        replace_file(target, before + content)
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW
    with os.fdopen(os.open(not_a_link(target), flags, 0o666), "ab") as f:
        f.write(content)


def own_directory(target: str | os.PathLike) -> str:
    """Creates the directory ``target`` (and its parents) unless it exists, and
    refuses a link there: Orbax and TensorBoard then write inside it. Object
    storage needs none: a prefix exists once an object is written under it."""
    if not is_remote(target):
        os.makedirs(not_a_link(target), exist_ok=True)
    return os.fspath(target)


def write_json(target: str | os.PathLike, content: Any) -> None:
    """Writes ``content`` as JSON to ``target`` (``replace_file``)."""
    replace_file(target, json.dumps(content, indent=2, sort_keys=True) + "\n")


def read_json(workdir: str | os.PathLike, name: str, what: str) -> Any:
    """``workdir``'s JSON file ``name``, which holds ``what``.

    Raises:
      RunError: the file is missing or is not JSON.
    """
    target = not_a_link(path(workdir, name))
    try:
        return json.loads(read_bytes(target))
    except FileNotFoundError:
        raise RunError(
            f"{os.fspath(workdir)!r} has no {name} ({what}): not a train.py workdir, "
            "or its run has not finished"
        ) from None
    except (OSError, ValueError) as e:
        raise RunError(f"{target} is unreadable ({e}); it holds {what}") from None


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` that ``train.py`` wrote to ``workdir``, as a dict."""
    config = read_json(workdir, CONFIG, "the run's config")
    if not isinstance(config, dict):
        raise RunError(f"{path(workdir, CONFIG)} is not a JSON object; it holds the run's config")
    return config


def write_config(workdir: str | os.PathLike, config: dict[str, Any]) -> None:
    """``config.json``: the run's resolved config, as JSON values (atomically)."""
    write_json(path(workdir, CONFIG), config)


def write_data_info(
    workdir: str | os.PathLike,
    dataset: str,
    image_shape,
    num_classes: int,
    class_names,
    resize_pictures: bool = False,
) -> None:
    """``data.json``: what the model takes and gives, for ``export``, ``predict`` and
    tools; ``resize_pictures``: the training pictures were resized to
    ``image_shape`` (a folder dataset), so new ones may be too."""
    info = {
        "dataset": dataset,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "resize_pictures": resize_pictures,
    }
    write_json(path(workdir, DATA_INFO), info)


def read_data_info(workdir: str | os.PathLike) -> dict[str, Any]:
    """``data.json``: ``dataset``, ``image_shape`` (HWC), ``num_classes``, ``class_names``."""
    info = read_json(workdir, DATA_INFO, "the image shape and classes")
    keys = ("dataset", "image_shape", "num_classes", "class_names")
    if not isinstance(info, dict) or any(key not in info for key in keys):
        raise RunError(f"{path(workdir, DATA_INFO)} lacks one of {', '.join(keys)}")
    return info
