"""Local paths and URIs (``gs://bucket/...``) alike: the file operations the
project needs, through ``etils.epath`` for URIs (the path layer of Orbax and
TFDS; on ``gs://`` it uses gcsfs).

Local paths keep the standard library's behaviour, so a run on a local disk
imports nothing more. Object storage has no directories: a "directory" is a
prefix that has objects under it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


def is_remote(target: str | os.PathLike) -> bool:
    """Whether ``target`` is a URI (``gs://...``) rather than a local path."""
    return "://" in os.fspath(target)


def remote(target: str | os.PathLike):
    """``target`` as an ``epath.Path``."""
    import logging

    import fsspec
    from etils import epath  # Only a URI needs it.

    for logger in ("gcsfs", "fsspec"):  # They log each file's read-ahead cache at INFO.
        logging.getLogger(logger).setLevel(logging.WARNING)
    # gcsfs caches listings for the life of the process; Orbax and TensorStore (and
    # other processes) write the same prefixes behind its back, so a listing must be fresh.
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
    return epath.Path(os.fspath(target))


def normal(target: str | os.PathLike) -> str:
    """``target`` with a URI's repeated slashes as one (``gs://b//run`` is ``gs://b/run``
    to Cloud Storage's clients, and one name must mean one place)."""
    target = os.fspath(target)
    scheme, _, rest = target.partition("://")
    bucket, _, path = rest.partition("/")
    if not is_remote(target) or not bucket:
        return target
    return "/".join([f"{scheme}://{bucket}", *(part for part in path.split("/") if part)])


def absolute(target: str | os.PathLike) -> str:
    """``target`` made absolute (a URI is already)."""
    return os.fspath(target) if is_remote(target) else os.path.abspath(target)


def join(directory: str | os.PathLike, name: str) -> str:
    return os.path.join(os.fspath(directory), name)


def exists(target: str | os.PathLike) -> bool:
    return remote(target).exists() if is_remote(target) else os.path.exists(target)


def is_file(target: str | os.PathLike) -> bool:
    return remote(target).is_file() if is_remote(target) else os.path.isfile(target)


def is_directory(target: str | os.PathLike) -> bool:
    return remote(target).is_dir() if is_remote(target) else os.path.isdir(target)


def list_names(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory``, sorted; none if it does not exist."""
    if is_remote(directory):
        folder = remote(directory)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def move_tree(source: str, target: str) -> None:
    """Moves the directory ``source`` to ``target``, replacing what was there. On
    object storage, which has no rename, each object is copied and then deleted."""
    if not is_remote(source):
        import shutil

        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(source, target)
        return
    source_path, target_path = remote(source), remote(target)
    if target_path.exists():
        target_path.rmtree()
    for file in _files(source_path):
        file.copy(target_path / file.relative_to(source_path))
    source_path.rmtree()


def _files(folder):
    """Every file under the ``epath.Path`` ``folder``."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _files(child)
        else:
            yield child


def read_bytes(target: str | os.PathLike) -> bytes:
    with open_binary(target) as f:
        return f.read()


def size(target: str | os.PathLike) -> int:
    """``target``'s size in bytes."""
    if not is_remote(target):
        return os.path.getsize(target)
    with named(target):
        return remote(target).stat().length


def open_binary(target: str | os.PathLike):
    """``target`` opened for reading bytes (a file object)."""
    if not is_remote(target):
        return open(target, "rb")
    with named(target):
        return remote(target).open("rb")


@contextlib.contextmanager
def named(target: str | os.PathLike) -> Iterator[None]:
    """A missing object is named by its URI (gcsfs names it by its storage URL's path)."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(target)
        ) from None


_copies: dict[str, str] = {}


def local_copy(target: str | os.PathLike) -> str:
    """A local path with ``target``'s content: ``target`` itself, or for a URI a
    copy downloaded once per process (for readers of local files only, such as
    ArrayRecord's), removed when the process exits."""
    target = os.fspath(target)
    if not is_remote(target):
        return target
    if target not in _copies:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="cnnflat_jax_copy.")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        copy = os.path.join(folder, remote(target).name)
        with open_binary(target) as source, open(copy, "wb") as f:
            shutil.copyfileobj(source, f, length=1 << 24)
        _copies[target] = copy
    return _copies[target]
