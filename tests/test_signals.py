"""SIGINT and SIGTERM at every phase of ``train.py``: start-up, loading, compiling,
training, eval, checkpointing and writing the outputs.

Each case reads the run's log until a phase begins, sends the signal, and
checks what users see: exit 130 or 143, no crash, and one line that is true
of what is on disk.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import idx_flags, write_idx_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Log lines that begin a phase: the data is loaded (the model is built next),
# the model is built (compiling next), compiled (training next), an epoch is
# done (its checkpoint, then the next epoch or the outputs).
MARKERS = ("Loaded ", "Model: ", "Compiled ", "epoch 1/2", "epoch 2/2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("data"))


def start(data, workdir):
    flags = idx_flags(data, num_epochs=2, steps_per_dispatch=1, checkpoint_every_steps=1000)
    return subprocess.Popen(
        [sys.executable, "train.py", *flags, "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def saved_steps(workdir):
    directory = workdir / "checkpoints"
    return {int(p) for p in os.listdir(directory) if p.isdigit()} if directory.is_dir() else set()


def assert_one_true_line(process, signum, workdir, earlier_log=""):
    _, rest = process.communicate(timeout=300)
    log = earlier_log + rest
    assert "Traceback" not in log and "Segmentation" not in log, log[-3000:]
    if process.returncode == 0:  # The signal came after the run had ended.
        assert (workdir / "final_params").is_dir()
        return
    assert process.returncode == 128 + signum, log[-3000:]
    name = signal.Signals(signum).name
    lines = [line for line in log.splitlines() if f"({name})" in line]
    assert len(lines) == 1, log[-3000:]
    (line,) = lines
    assert line.startswith("preempted" if signum == signal.SIGTERM else "interrupted")
    if "nothing new was saved" in line or "nothing was saved" in line:
        assert not saved_steps(workdir)
    elif "saved a checkpoint" in line:
        step = int(line.split(" at step ")[1].split(";")[0])
        assert step in saved_steps(workdir)
    else:
        assert "outputs are complete" in line, line
        assert (workdir / "final_params").is_dir() and (workdir / "data.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("marker", MARKERS)
def test_a_signal_at_each_phase_gives_its_exit_code_and_one_true_line(
    data, tmp_path, marker, signum
):
    process = start(data, tmp_path)
    log = ""
    while marker not in log:
        line = process.stderr.readline()
        assert line, log[-3000:]  # The run ended before the phase.
        log += line
    process.send_signal(signum)
    assert_one_true_line(process, signum, tmp_path, log)


def test_signals_while_the_process_exits_never_end_it_without_a_line(data, tmp_path):
    """From the run's last log line until the process is gone (outputs written, the
    interpreter finalising), a signal every few milliseconds: it ends with 0, or with
    128 + the signal and the line saying that the outputs are complete."""
    signum = signal.SIGTERM
    process = start(data, tmp_path)
    log = ""
    while "Done: " not in log:
        line = process.stderr.readline()
        assert line, log[-3000:]
        log += line
    while process.poll() is None:
        process.send_signal(signum)
        time.sleep(0.003)
    assert_one_true_line(process, signum, tmp_path, log)


# A process whose last object, torn down with the interpreter's modules (after
# Python stops running signal handlers), receives SIGTERM.
SIGNAL_AS_THE_INTERPRETER_ENDS = """
import os, signal, time
from cnnflat_jax.run import signals
signals.exit_on_signals("exiting; the run had ended and its outputs are complete")
class Last:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
last = Last()
"""


def test_a_signal_as_the_interpreter_finalises_is_ignored_not_a_silent_kill():
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AS_THE_INTERPRETER_ENDS],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Python resets the handlers it set to the default there: killed by SIGTERM (-15),
    # without a line, unless the signals are ignored by then.
    assert result.returncode == 0, (result.returncode, result.stderr)


@pytest.mark.parametrize("trial", range(2))
def test_a_signal_at_a_random_moment_gives_its_exit_code_and_one_true_line(data, tmp_path, trial):
    rng = random.Random(trial)
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    process = start(data, tmp_path)
    time.sleep(rng.uniform(0.0, 10.0))
    process.send_signal(signum)
    assert_one_true_line(process, signum, tmp_path)
