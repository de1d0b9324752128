"""Where a run's seconds go, from launch to exit: `python train.py` as a user runs it.

    python -m benchmarks.startup --configs smoke,fast --rounds 3 [--checkout DIR]

Each round launches ``train.py --help``, then, for each config, one run with
an empty compilation cache (cold) and one with the cache the cold run filled
(warm), each in a new workdir, and reads the seconds of each part:

- import: launch to the trainer's start (Python, JAX, the libraries, the flags);
- data, build, resume, compile, train, eval, records, checkpoint, outputs: the
  trainer's phases, from its ``Time:`` log line (``reporting.Phases``);
- other: the trainer's time outside those phases (the config check, the lock);
- exit: the ``Time:`` line to the process's end;
- to 91%: launch to the log line of the first epoch with >= 91% test accuracy.

Medians over the rounds. ``--checkout`` times another checkout's ``train.py``
with this interpreter (an older commit, for a before-and-after in one
sitting); where it logs no ``Time:`` line, only the launch-to-exit columns
are filled.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIGS = flags.DEFINE_list("configs", ["smoke", "fast"], "Shipped configs to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; medians are reported.")
_CHECKOUT = flags.DEFINE_string("checkout", ".", "The checkout whose train.py is launched.")

_TIME_LINE = re.compile(r"Time: (.*); total ([\d.]+) s")
_EPOCH_LINE = re.compile(r"epoch \d+/\d+: .* \| test loss \S+ acc (\S+)")
TARGET_ACCURACY = 0.91


def launch(arguments: list[str], env: dict[str, str]) -> dict[str, float]:
    """Runs ``python train.py ARGUMENTS`` from the checkout; the seconds of each part."""
    command = [sys.executable, "train.py", *arguments]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=_CHECKOUT.value, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    parts, tail = {}, []
    for line in process.stderr:
        now = time.perf_counter() - start
        tail = [*tail[-20:], line]
        if (match := _EPOCH_LINE.search(line)) and float(match[1]) >= TARGET_ACCURACY:
            parts.setdefault("to 91%", now)
        if match := _TIME_LINE.search(line):
            for phase in match[1].split(", "):
                name, seconds, _ = phase.rsplit(" ", 2)
                parts[name] = float(seconds)
            total = float(match[2])
            parts["import"] = now - total
            phases = sum(v for k, v in parts.items() if k not in ("to 91%", "import"))
            parts["other"] = total - phases
            parts["line"] = now
    process.wait()
    parts["launch to exit"] = time.perf_counter() - start
    if "line" in parts:
        parts["exit"] = parts["launch to exit"] - parts.pop("line")
    if process.returncode != (1 if arguments == ["--help"] else 0):  # absl's --help exits 1.
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(tail)}")
    return parts


def main(argv):
    del argv
    rows: dict[str, dict[str, list[float]]] = {}
    for r in range(_ROUNDS.value):
        rows.setdefault("--help", {}).setdefault("launch to exit", []).append(
            launch(["--help"], dict(os.environ))["launch to exit"]
        )
        for name in _CONFIGS.value:
            with tempfile.TemporaryDirectory() as scratch:
                env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(scratch, "cache")}
                for cache in ("cold", "warm"):
                    workdir = os.path.join(scratch, cache)
                    arguments = ["--config", f"configs/{name}.py", "--workdir", workdir,
                                 "--config.progress_bar=False"]  # fmt: skip
                    parts = launch(arguments, env)
                    print(f"round {r}: {name}, {cache} cache: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
                          file=sys.stderr, flush=True)  # fmt: skip
                    for part, seconds in parts.items():
                        rows.setdefault(f"{name}, {cache}", {}).setdefault(part, []).append(seconds)

    columns = list(rows)
    seen = list(dict.fromkeys(p for column in rows.values() for p in column))
    last = ["other", "exit", "to 91%", "launch to exit"]
    parts = ["import", *(p for p in seen if p not in ["import", *last]), *last]
    parts = [p for p in parts if p in seen]
    checkout = os.path.abspath(_CHECKOUT.value)
    print(f"\nSeconds, medians of {_ROUNDS.value} rounds; train.py of {checkout}")
    print("| part | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for part in parts:
        cells = [
            f"{statistics.median(rows[c][part]):.2f}" if part in rows[c] else "" for c in columns
        ]
        print(f"| {part} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
