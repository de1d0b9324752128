"""When another process of a multi-process run dies, the others stop in one line.

There are two ways a process learns that a peer is gone:

- a collective it is in fails (Gloo's connection is reset): JAX raises, and
  ``train.py`` prints ``error: LOST_PEER`` and leaves;
- JAX's coordination service sees the peer (or process 0, which runs the
  service) go: its client ends the process with a fatal log line and a dump
  of every thread's stack, which no Python code can catch. ``train.py`` routes
  a multi-process run's stderr through ``filter_stderr``'s small process,
  which passes everything through until that line, writes ``error: LOST_PEER``
  in its place, and drops the dump that follows.

Either way the process ends within seconds of the loss; the checkpoints
written before it are intact, and rerunning every process resumes.
"""

import os
import subprocess
import sys

LOST_PEER = (
    "another process of this run stopped (killed, preempted, or its host lost), so this one "
    "stops too; the checkpoints written before are intact: rerun every process to resume"
)
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"

# The filter: copies its input to its output as it arrives (a progress bar's
# partial lines too) until JAX's fatal line, which becomes one error line, or
# nothing if the run said why it stops first (a save or a collective that failed
# as the peer went).
_FILTER = """
import os, sys
fatal, error = sys.argv[1].encode(), b"error: " + sys.argv[2].encode() + b"\\n"
tail = b""  # The end of what was written, from its last line's start.
said = False  # Whether the run has already written its own error line.
while chunk := os.read(0, 65536):
    text = tail + chunk
    found = text.find(fatal)
    if found < 0:
        os.write(1, chunk)
        said = said or text.startswith(b"error: ") or b"\\nerror: " in text
        tail = text[text.rfind(b"\\n") + 1 :][-4096:]
        continue
    line_start = text.rfind(b"\\n", 0, found) + 1
    said = said or text.startswith(b"error: ") or b"\\nerror: " in text[:line_start]
    os.write(1, text[len(tail) : max(line_start, len(tail))])
    if not said:
        os.write(1, (b"\\n" if line_start < len(tail) else b"") + error)
    while os.read(0, 65536):  # The dump that follows, until the process is gone.
        pass
"""


_filtering = [False]


def filtering() -> bool:
    """Whether stderr goes through the filter: then nothing may hold it back
    elsewhere (``checkpoints``), or JAX's fatal line would be held where no one
    reads it when the process ends."""
    return _filtering[0]


def filter_stderr() -> None:
    """Routes this process's stderr (fd 2) through the filter, from now on."""
    _filtering[0] = True
    read_end, write_end = os.pipe()
    subprocess.Popen(
        [sys.executable, "-c", _FILTER, _FATAL.decode(), LOST_PEER],
        stdin=read_end, stdout=sys.__stderr__.fileno(), close_fds=True,
        start_new_session=True,  # Signals to the run's process group (Ctrl-C, JAX's) are not its.
    )  # fmt: skip
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
