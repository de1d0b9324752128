"""The workdir lock: one run at a time in a workdir, on a local disk or on ``gs://``.

``workdir_lock`` is the one interface. On a local disk it is an ``flock`` on
the directory itself, which the kernel drops when the process ends, however
it ends. On object storage (``gs://``) it is a lease object at ``W/.lock``.
A bucket has no ``flock``, and nothing ends with the process that held it.
So the lock is an object that its holder keeps renewing, and every write of
it is conditional on the object's generation, which Cloud Storage checks
atomically:

- **Taking it.** ``W/.lock`` is created only if absent (generation 0): of two
  runs that start together, one creates it and the other is refused.
- **Holding it.** A thread rewrites it every quarter of the lease, each time
  on the condition that it is still the generation this run wrote last.
- **In use.** A run that finds a lease renewed less than its lease seconds
  ago (by the bucket's clock, the object's update time) gets the same
  one-line ``error: W is in use by ...`` as on a local disk.
- **Taking over.** A lease not renewed for its lease seconds belongs to a run
  that is gone (killed, its VM preempted); so does one whose holder was a
  process on this same machine that no longer exists (a rerun after a crash
  need not wait, as a ``flock`` on a disk dies with its process). It is
  rewritten on the condition of the generation just read, so of two runs
  that both take over, one wins.
- **Losing it.** A holder whose renewal fails its condition was stalled for
  longer than its lease, and another run has taken over: it stops at once,
  with one line, before it writes anything more.

The guarantee rests on the bucket's preconditions and on the host clocks
being within a few seconds of the bucket's (NTP, as on every Cloud VM).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from absl import logging

from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.run.workdir import RunError


@contextlib.contextmanager
def workdir_lock(workdir: str, lease_sec: float = 60.0) -> Iterator[None]:
    """Creates ``workdir`` and holds an exclusive OS lock on the directory itself
    (process 0 only); ``workdir/.lock`` names the holder's PID for others to read.

    The lock belongs to the directory, not to a file in it, so deleting
    ``.lock`` does not release it; the kernel drops it when the process ends,
    however it ends, so a crash never leaves a stale lock behind.

    On ``gs://`` the lock is a lease object renewed while the run lives, and
    taken over ``lease_sec`` after a crashed run's last renewal, or at once by
    a run on the machine where its holder ran and ended (``Lease``).

    Raises:
      RunError: the workdir cannot be made or written, ``.lock`` is a symbolic
        link, or another process holds the lock (named by its PID).
    """
    if workdir_lib.is_remote(workdir):
        bucket, _, folder = workdir.removeprefix("gs://").partition("/")
        if not bucket or not folder.strip("/"):
            raise RunError(f"cannot use {workdir} as the workdir: not gs://BUCKET/FOLDER")
        if jax.process_index() > 0:
            yield
            return
        with Lease(workdir_lib.path(workdir, workdir_lib.LOCK), lease_sec, workdir):
            yield
        return
    workdir_lib.check_path_room(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() > 0:
            directory = None
        else:
            directory = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        why = "it is a file" if os.path.isfile(workdir) else e.strerror
        raise RunError(f"cannot use {workdir} as the workdir: {why} ({e.filename})") from None
    if directory is None:
        yield
        return
    try:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{workdir} is in use by process {_lock_holder(workdir)}") from None
        workdir_lib.check_no_links(workdir)
        lock = workdir_lib.path(workdir, workdir_lib.LOCK)
        try:
            workdir_lib.replace_file(lock, f"{os.getpid()}\n")
        except OSError as e:
            raise RunError(f"cannot use {workdir} as the workdir: {e.strerror} ({lock})") from None
        yield
    finally:
        os.close(directory)  # Releases the lock.


def _lock_holder(workdir: str) -> str:
    """The PID in ``workdir/.lock``, read without following a link; "unknown" if none."""
    try:
        flags = os.O_RDONLY | workdir_lib.NO_FOLLOW
        with os.fdopen(os.open(workdir_lib.path(workdir, workdir_lib.LOCK), flags)) as f:
            return f.read(32).strip() or "unknown"
    except OSError:
        return "unknown"


def _blob(uri: str) -> Any:
    from google.cloud import storage  # Only a run on gs:// needs it.

    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return storage.Client().bucket(bucket).blob(name)


def _this_machine() -> str | None:
    """Where a PID names one process: this host, boot and PID namespace (Linux
    only; ``None`` elsewhere, and then only the lease's age counts)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), ``None`` if there is
    no such process: with the PID, one process, even once the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        try:
            os.kill(pid, 0)  # Hidden from /proc (hidepid) but alive?
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    return stat.rsplit(")", 1)[1].split()[19]  # Field 22; the name before ")" may hold spaces.


def _seconds(value: Any, default: float) -> float:
    """A lease's seconds as its holder wrote them; ``default`` for anything else
    (a lease edited by hand: null, a word, a negative number)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if math.isfinite(seconds) and seconds > 0 else default


def _holder_gone(held: dict) -> bool:
    """Whether the lease's holder ran on this machine and has ended."""
    machine = _this_machine()
    if machine is None or held.get("machine") != machine or not isinstance(held.get("pid"), int):
        return False
    return _start_time(held["pid"]) != held.get("started")


class Lease:
    """Holds ``uri`` (a ``gs://`` object) for this process while it runs.

    Raises (from ``__enter__``):
      RunError: another live run holds it, or the URI is not on Cloud Storage.
    """

    def __init__(self, uri: str, seconds: float, workdir: str):
        if not uri.startswith("gs://"):
            raise RunError(
                f"cannot lock {workdir}: a workdir is a local directory or on gs:// "
                "(Cloud Storage's preconditions make its lock)"
            )
        self.uri = uri
        self.seconds = seconds
        self.workdir = workdir
        self.holder = f"process {os.getpid()} on {socket.gethostname()}"
        machine = _this_machine()
        self._content = json.dumps({
            "holder": self.holder, "lease_sec": seconds, "machine": machine,
            "pid": os.getpid(), "started": machine and _start_time(os.getpid()),
        }).encode()  # fmt: skip
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)

    def _write(self, if_generation_match: int) -> None:
        blob = _blob(self.uri)
        blob.upload_from_string(self._content, if_generation_match=if_generation_match)
        self._generation = blob.generation
        self._renewed_at = time.monotonic()

    def __enter__(self) -> Lease:
        from google.api_core import exceptions

        try:
            self._write(if_generation_match=0)
        except exceptions.PreconditionFailed:
            self._take_over_if_expired()
        except exceptions.NotFound:
            bucket = self.uri.removeprefix("gs://").partition("/")[0]
            raise RunError(
                f"cannot use {self.workdir} as the workdir: there is no bucket {bucket!r}"
            ) from None
        except exceptions.GoogleAPIError as e:  # Forbidden, unreachable, ...
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RunError(f"cannot use {self.workdir} as the workdir: {cause[:300]}") from None
        # Where the renewing thread's lines go: the process's stderr as it is now,
        # even while a checkpoint's save holds stderr back (``checkpoints``).
        self._stderr = os.dup(2)
        self._thread.start()
        return self

    def _take_over_if_expired(self) -> None:
        from google.api_core import exceptions

        blob = _blob(self.uri)
        try:
            blob.reload()
            held = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except exceptions.NotFound:  # Released meanwhile: take it as new.
            held = {}
        except (exceptions.PreconditionFailed, ValueError):  # Renewed meanwhile, or not ours.
            held = {"holder": "an unknown run", "lease_sec": self.seconds}
        if not isinstance(held, dict):
            held = {}
        holder = held.get("holder", "an unknown run")
        lease_sec = _seconds(held.get("lease_sec"), self.seconds)
        why = "released meanwhile"
        if blob.updated is not None:
            age = max((datetime.datetime.now(datetime.UTC) - blob.updated).total_seconds(), 0)
            why = f"not renewed for {age:.0f} s"
            if age < lease_sec:
                if not _holder_gone(held):
                    raise RunError(
                        f"{self.workdir} is in use by {holder} (its lease on {self.uri} was "
                        f"renewed {age:.0f} s ago; a run that is gone leaves it {lease_sec:g} s "
                        "after its last renewal, or at once to a run on its own machine)"
                    )
                why = f"{why}; it ran on this machine and has ended"
        try:
            self._write(if_generation_match=blob.generation or 0)
        except exceptions.PreconditionFailed:
            raise RunError(f"{self.workdir} is in use by another run (it took over the lease "
                           f"{self.uri} a moment ago)") from None  # fmt: skip
        logging.info("Took over the lease %s from %s (%s)", self.uri, holder, why)

    def _renew(self) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(self.seconds / 4):
            try:
                self._write(if_generation_match=self._generation)
            except exceptions.PreconditionFailed:
                try:  # Deleted by hand: nobody else holds it if it can be created again.
                    self._write(if_generation_match=0)
                except exceptions.PreconditionFailed:
                    self._lost(
                        f"to another run (this one was stalled for more than {self.seconds:g} s)"
                    )
            except Exception as e:  # A network failure: the next renewal may succeed,
                cause = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._say(f"warning: could not renew the lease {self.uri}: {cause[:200]}")
                if time.monotonic() - self._renewed_at > self.seconds:  # unless it expired.
                    self._lost(
                        f"because its storage did not answer for more than {self.seconds:g} s "
                        f"({cause[:200]})"
                    )

    def _say(self, line: str) -> None:
        os.write(self._stderr, f"{line}\n".encode())

    def _lost(self, why: str) -> None:
        self._say(f"error: this run lost its lease on {self.workdir} {why}; stopping without "
                  "writing more")  # fmt: skip
        os._exit(1)  # Any other way out could still write a checkpoint over the new holder's.

    def __exit__(self, *exc: object) -> None:
        from google.api_core import exceptions

        self._stop.set()
        self._thread.join()
        try:
            _blob(self.uri).delete(if_generation_match=self._generation)
        except exceptions.GoogleAPIError:
            pass  # Taken over or gone: either way no longer this run's.
        os.close(self._stderr)
