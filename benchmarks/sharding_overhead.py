"""What data parallelism costs on one machine, and what a checkpoint save costs.

    python -m benchmarks.sharding_overhead --config configs/default.py --rounds 5

Splits the CPU into 8 fake devices (``jax_num_cpu_devices``) and times the
compiled training loop (batch 128, real Fashion-MNIST, the host gather and
the transfer included) on a ``data`` mesh of 1, 2, 4 and 8 of them: the
same global batch, so the ratio to 1 device is the overhead of splitting it
and all-reducing the gradient. Then the time of one ``RunCheckpoints.save``
of the full train state (parameters and Adam moments). Every round times
all variants back to back; medians over rounds.
"""

import statistics
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import programs
from cnnflat_jax.data import input_pipeline
from cnnflat_jax.run import checkpoints
from cnnflat_jax.train import sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per timed call.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Mesh sizes.")


def build(config, data, num_devices):
    """``run()``: seconds for a dispatch of ``_STEPS`` steps on ``num_devices`` devices."""
    mesh = sharding.data_mesh(num_devices)
    training = programs.training(config, data, loop="compiled", steps=_STEPS.value, mesh=mesh)

    def run():
        start = time.perf_counter()
        training.run(1)
        return time.perf_counter() - start

    run()  # Warm up.
    return run, lambda: training.state  # The state is donated each call: read the current one.


def main(_):
    config = _CONFIG.value
    data = input_pipeline.load_data(config, data_shards=1)
    sizes = [int(n) for n in _DEVICES.value]
    runs = {n: build(config, data, n) for n in sizes}
    seconds = {n: [] for n in sizes}
    save_seconds = []
    with tempfile.TemporaryDirectory() as directory:
        saver = checkpoints.RunCheckpoints(directory, keep=2)
        current_state = runs[sizes[0]][1]
        for r in range(_ROUNDS.value):
            for n, (run, _) in runs.items():
                seconds[n].append(run())
            start = time.perf_counter()
            state = current_state()
            saver.save(r, state, {"epoch": 1})
            save_seconds.append(time.perf_counter() - start)
        saver.close()
    images = _STEPS.value * config.batch_size
    median = {n: statistics.median(values) for n, values in seconds.items()}
    num_bytes = sum(
        x.nbytes for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)
    )
    print(f"\nbatch {config.batch_size}, {_STEPS.value} steps per call, {_ROUNDS.value} rounds, "
          f"{jax.device_count()} fake {jax.devices()[0].device_kind} devices, "
          f"jax {jax.__version__}")  # fmt: skip
    print("| devices | images/s | time vs 1 device |\n|---|---|---|")
    for n in sizes:
        print(f"| {n} | {images / median[n]:.0f} | {median[n] / median[sizes[0]]:.2f} |")
    print(f"\ncheckpoint save (train state, {num_bytes / 2**20:.1f} MiB): "
          f"{statistics.median(save_seconds) * 1000:.0f} ms median")  # fmt: skip


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    app.run(main)
