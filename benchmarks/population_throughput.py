"""What vmap buys: K models in one program vs one model, and per-example grads.

    python -m benchmarks.population_throughput --config configs/default.py --rounds 5

For K = 1, 2, 4, 8 members of the default CNN sharing each batch (batch 128,
compiled loop, real Fashion-MNIST), reports member-images/s in total and per
member, the cost of one K-member program relative to K single-model runs one
after another (< 1 means vmap saves time), and XLA's memory estimate for the
program. Then the per-example-gradient (DP-SGD) step against the plain step.
Every round times all variants back to back; medians over rounds.
"""

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import programs
from cnnflat_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps per timed call.")
_SIZES = flags.DEFINE_list("sizes", ["1", "2", "4", "8"], "Population sizes.")


def build(config, data, size, clip_norm=0.0):
    """``train.py``'s compiled loop for ``size`` members sharing each batch (1 = one model)."""
    config = config.copy_and_resolve_references()
    config.population.size = size
    config.per_example.clip_norm = clip_norm
    training = programs.training(config, data, loop="compiled", steps=_STEPS.value)
    memory = training.program.compiled.memory_analysis()
    mib = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**20

    def run():
        start = time.perf_counter()
        training.run(1)
        return time.perf_counter() - start

    run()  # Warm-up.
    return run, mib


def main(_):
    config = _CONFIG.value
    data = input_pipeline.load_data(config, data_shards=1)
    sizes = [int(k) for k in _SIZES.value]
    runs = {k: build(config, data, k) for k in sizes}
    runs["dp"] = build(config, data, 1, clip_norm=1.0)
    seconds = {name: [] for name in runs}
    for _ in range(_ROUNDS.value):
        for name, (run, _) in runs.items():
            seconds[name].append(run())
    median = {name: statistics.median(values) for name, values in seconds.items()}
    images = _STEPS.value * config.batch_size
    print(f"\nbatch {config.batch_size}, {_STEPS.value} steps per call, {_ROUNDS.value} rounds, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")  # fmt: skip
    print("| K | member-images/s total | per member | time vs K single runs | XLA MiB |")
    print("|---|---|---|---|---|")
    for k in sizes:
        total = k * images / median[k]
        ratio = median[k] / (k * median[1])
        print(f"| {k} | {total:.0f} | {total / k:.0f} | {ratio:.2f} | {runs[k][1]:.0f} |")
    dp_ratio = median["dp"] / median[1]
    print(f"\nper-example-gradient (DP-SGD) step: {images / median['dp']:.0f} images/s, "
          f"{dp_ratio:.2f}x the plain step's time ({images / median[1]:.0f} images/s)")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
