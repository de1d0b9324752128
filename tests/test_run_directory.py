"""The run directory against a hostile co-user: links planted in it, its lock file deleted.

Every case runs ``train.py`` in a subprocess on a tiny IDX dataset.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import idx_flags, write_idx_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(data, workdir, **overrides):
    command = [sys.executable, "train.py", *idx_flags(data, **overrides), "--workdir", str(workdir)]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def victim(tmp_path):
    """A file the training user can write, outside the workdir."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize(
    "name", [".lock", "config.json", "metrics.jsonl", "data.json", "curves.png", "checkpoints"]
)
def test_a_link_where_the_run_expects_its_own_file_is_one_line_and_writes_nothing(
    data, tmp_path, victim, name
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    os.symlink(victim, workdir / name)
    process = start(data, workdir)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        f"error: {workdir / name} is a symbolic link; a run writes only its own files in its "
        "workdir (remove the link, or use another --workdir)"
    ]
    assert victim.read_text() == "precious\n"
    assert not (workdir / "checkpoints").is_dir() or name == "checkpoints"  # No work was done.


def test_links_planted_at_the_temporary_names_are_removed_not_followed(data, tmp_path, victim):
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("config.json.tmp", "metrics.jsonl.tmp", ".lock.tmp", "data.json.tmp"):
        os.symlink(victim, workdir / name)
    process = start(data, workdir)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert victim.read_text() == "precious\n"
    for name in ("config.json", "metrics.jsonl", "data.json", ".lock"):
        assert (workdir / name).is_file() and not (workdir / name).is_symlink()
    assert (workdir / ".lock").read_text().strip().isdigit()


def test_deleting_the_lock_file_does_not_let_a_second_run_in(data, tmp_path):
    workdir = tmp_path / "run"
    first = start(data, workdir, num_epochs=1000, checkpoint_every_steps=10**9)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / ".lock").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        pid = (workdir / ".lock").read_text().strip()
        os.remove(workdir / ".lock")
        second = start(data, workdir)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 1, stderr[-3000:]
        assert stderr.strip().splitlines() == [f"error: {workdir} is in use by process unknown"]
        assert pid == str(first.pid) and first.poll() is None  # The first run goes on.
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
