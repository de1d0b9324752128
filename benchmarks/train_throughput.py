"""Training throughput of the default CNN: per-step loop vs compiled loop.

    python -m benchmarks.train_throughput --config configs/default.py --rounds 5 \
        [--time_to_accuracy [--accuracy_config configs/fast.py]]

Each round times both loops (``train_lib.build_train``'s programs, as
``train.py`` builds them, the host gather included) on the same real
Fashion-MNIST batches, one after the other, so their ratio is measured under
the same machine load. Reports
medians over rounds: training images/s for each loop and their ratio, compile
seconds, eval images/s, peak RSS, and (with --time_to_accuracy) the wall
seconds from launching `python train.py --config <accuracy_config>` to the
log line of the first epoch with >= 91% test accuracy.
"""

import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import programs
from cnnflat_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps timed per loop per round.")
_TIME_TO_ACCURACY = flags.DEFINE_boolean(
    "time_to_accuracy", False, "Also time `python train.py` until 91% test accuracy."
)
_ACCURACY_CONFIG = flags.DEFINE_string(
    "accuracy_config", "configs/fast.py", "The config that --time_to_accuracy trains."
)
_EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: .* \| test loss \S+ acc (\S+)")


def seconds_to_accuracy(config_path, target=0.91):
    """Runs train.py as a user does; seconds from launch to the epoch reaching ``target``.

    Returns ``(seconds, epoch, accuracy)``, with ``seconds`` None if no epoch did.
    """
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "train.py", "--config", config_path, "--workdir", workdir,
                   "--config.progress_bar=False"]  # fmt: skip
        start = time.perf_counter()
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        reached, epoch, accuracy = None, 0, 0.0
        for line in process.stderr:
            match = _EPOCH_LINE.search(line)
            if match and reached is None:
                epoch, accuracy = int(match[1]), float(match[2])
                if accuracy >= target:
                    reached = time.perf_counter() - start
        if process.wait() != 0:
            raise RuntimeError(f"{' '.join(command)} failed with status {process.returncode}")
    return reached, epoch, accuracy


def main(_):
    config = _CONFIG.value
    data = input_pipeline.load_data(config, data_shards=1)
    batch = config.batch_size
    loops = {
        loop: programs.training(config, data, loop=loop, steps=_STEPS.value)
        for loop in ("per_step", "compiled")
    }
    compile_sec = {loop: run.compile_sec for loop, run in loops.items()}
    evaluate, compile_sec["eval"] = programs.eval_program(config, data, loops["compiled"].state)

    def timed(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    # Warm-up, then rounds: both loops on the same dispatches, back to back.
    for run in loops.values():
        run.run(0)
    rates = {"per_step": [], "compiled": [], "ratio": [], "eval": []}
    for r in range(_ROUNDS.value):
        per = _STEPS.value * batch / timed(lambda r=r: loops["per_step"].run(1 + r))
        comp = _STEPS.value * batch / timed(lambda r=r: loops["compiled"].run(1 + r))
        ev = len(data.test_labels) / timed(lambda: evaluate(loops["compiled"].state))
        for name, value in zip(rates, (per, comp, comp / per, ev)):
            rates[name].append(value)
        logging.info(
            "round %d: per-step %.0f, compiled %.0f img/s (x%.2f), eval %.0f img/s",
            r, per, comp, comp / per, ev,
        )  # fmt: skip

    median = {name: statistics.median(values) for name, values in rates.items()}
    rows = [
        ("train images/s, per-step loop", f"{median['per_step']:.0f}"),
        ("train images/s, compiled loop", f"{median['compiled']:.0f}"),
        ("compiled / per-step (same round)", f"{median['ratio']:.2f}"),
        ("eval images/s", f"{median['eval']:.0f}"),
        (f"compile s, compiled loop ({_STEPS.value} steps)", f"{compile_sec['compiled']:.2f}"),
        ("compile s, per-step step", f"{compile_sec['per_step']:.2f}"),
        ("compile s, eval", f"{compile_sec['eval']:.2f}"),
    ]
    if _TIME_TO_ACCURACY.value:
        seconds, epoch, accuracy = seconds_to_accuracy(_ACCURACY_CONFIG.value)
        name = (
            f"wall s from `python train.py --config {_ACCURACY_CONFIG.value}` to 91% test accuracy"
        )
        if seconds is None:
            rows.append((f"91% NOT reached by {name}", f"epoch {epoch}: {accuracy:.4f}"))
        else:
            rows.append((name, f"{seconds:.1f} (epoch {epoch}: {accuracy:.4f})"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak RSS MiB", f"{peak_mib:.0f}"))
    print(f"\nDefault CNN, batch {batch}, {_ROUNDS.value} rounds x {_STEPS.value} steps, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")  # fmt: skip
    print("| measure | median |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    app.run(main)
