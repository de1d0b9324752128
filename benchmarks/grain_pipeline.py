"""The grain input pipeline beside the memory pipeline: speed, accuracy, memory.

    python -m benchmarks.grain_pipeline --rounds 5
    python -m benchmarks.grain_pipeline --what accuracy
    python -m benchmarks.grain_pipeline --what memory --repeat 10

Every run is ``train.py`` as users run it, in its own process, on real
Fashion-MNIST: the IDX files (memory) and ArrayRecord files written from
them by ``python -m cnnflat_jax.array_records`` (grain).

- ``throughput``: ``--config`` for 2 epochs with each pipeline, the order
  alternating each round; epoch 2's ``images_per_sec`` from
  ``metrics.jsonl``. Reports the medians and the median per-round ratio.
- ``accuracy``: ``--config`` to the end with each pipeline; final test accuracy.
- ``memory``: one epoch of ``configs/smoke.py``'s small model on the whole
  training set, and on it repeated ``--repeat`` times (the memory pipeline
  from repeated IDX files, grain from repeated records); each process's peak
  resident memory (``wait4``'s ``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from cnnflat_jax.data import array_records, idx, input_pipeline
from cnnflat_jax.run import workdir as workdir_lib

_CONFIG = flags.DEFINE_string("config", "configs/default.py", "The config file to run.")
_WHAT = flags.DEFINE_enum(
    "what", "throughput", ["throughput", "accuracy", "memory"], "What to measure."
)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "throughput: rounds, each running both pipelines.")
_REPEAT = flags.DEFINE_integer(
    "repeat", 10, "memory: the larger dataset is the training set x this."
)

PIPELINES = ("memory", "grain")


def train_py(workdir: str, config: str, pipeline: str, data: dict[str, str], *flags: str):
    """Runs ``train.py``; returns its ``metrics.jsonl`` records and peak RSS in MiB."""
    command = [
        sys.executable, "train.py", "--config", config, "--workdir", workdir,
        f"--config.input_pipeline={pipeline}", "--config.data_source=idx",
        f"--config.idx_dir={data['idx']}", f"--config.array_record_dir={data['records']}",
        "--config.progress_bar=False", *flags,
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        err = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)  # Its own peak RSS, not all children's.
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    with open(workdir_lib.path(workdir, workdir_lib.METRICS)) as f:
        records = [json.loads(line) for line in f]
    return records, usage.ru_maxrss / 1024  # Linux reports KiB.


def write_idx_dir(directory: str, train, test) -> None:
    """MNIST-format IDX files of ``(images NHWC, labels)`` train and test splits."""
    os.makedirs(directory)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        idx.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), images[..., 0])
        idx.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels)


def datasets(root: str, repeats: list[int]) -> dict[int, dict[str, str]]:
    """Fashion-MNIST with its training set repeated each of ``repeats`` times, as IDX
    files and as ArrayRecord files."""
    data = input_pipeline.load_dataset("fashion_mnist", source="idx")
    test = (data.test_images, data.test_labels)
    out = {}
    for k in repeats:
        paths = {"idx": os.path.join(root, f"idx_x{k}"), "records": os.path.join(root, f"ar_x{k}")}
        train = (np.concatenate([data.train.images] * k), np.concatenate([data.train.labels] * k))
        write_idx_dir(paths["idx"], train, test)
        splits = {"train": (data.train.images, data.train.labels), "test": test}
        array_records.write(paths["records"], "fashion_mnist", data.num_classes, splits, repeat=k)
        out[k] = paths
    return out


def machine() -> str:
    """The CPU, its core count and its vector extensions (``lscpu``'s flags)."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    model = next(
        (line.split(":")[1].strip() for line in lines if line.startswith("model name")), ""
    )
    flags_line = next((line for line in lines if line.startswith("flags")), "flags:")
    vector = sorted(f for f in flags_line.split(":")[1].split() if f.startswith(("avx", "amx")))
    return f"{model or platform.machine()}, {os.cpu_count()} CPUs, {' '.join(vector)}"


def throughput(root: str) -> None:
    data = datasets(root, [1])[1]
    speeds = {p: [] for p in PIPELINES}
    ratios = []
    for r in range(_ROUNDS.value):
        for pipeline in PIPELINES if r % 2 == 0 else PIPELINES[::-1]:
            workdir = os.path.join(root, f"run_{r}_{pipeline}")
            records, _ = train_py(workdir, _CONFIG.value, pipeline, data, "--config.num_epochs=2")
            speeds[pipeline].append(records[-1]["images_per_sec"])
        ratios.append(speeds["grain"][-1] / speeds["memory"][-1])
        print(f"round {r + 1}: " + ", ".join(f"{p} {speeds[p][-1]:,.0f}" for p in PIPELINES))
    print(f"\n{_CONFIG.value}, 2 epochs, epoch 2 images/s, {_ROUNDS.value} rounds (medians)")
    print("| pipeline | train images/s | grain / memory |\n|---|---|---|")
    for pipeline in PIPELINES:
        ratio = f"{statistics.median(ratios):.3f}" if pipeline == "grain" else "1"
        print(f"| {pipeline} | {statistics.median(speeds[pipeline]):,.0f} | {ratio} |")


def accuracy(root: str) -> None:
    data = datasets(root, [1])[1]
    print(f"\n{_CONFIG.value} to the end")
    print("| pipeline | test accuracy | epochs |\n|---|---|---|")
    for pipeline in PIPELINES:
        records, _ = train_py(os.path.join(root, pipeline), _CONFIG.value, pipeline, data)
        print(f"| {pipeline} | {records[-1]['test_accuracy']:.4f} | {records[-1]['epoch']} |")


def memory(root: str) -> None:
    print("\nconfigs/smoke.py model, 1 epoch on all training images: peak RSS (MiB)")
    print("| training images | memory | grain |\n|---|---|---|")
    for k, data in datasets(root, [1, _REPEAT.value]).items():
        peaks = {}
        for pipeline in PIPELINES:
            _, peaks[pipeline] = train_py(
                os.path.join(root, f"run_x{k}_{pipeline}"), "configs/smoke.py", pipeline, data,
                "--config.num_train_examples=0", "--config.num_test_examples=0",
            )  # fmt: skip
        print(f"| {60_000 * k:,} | {peaks['memory']:,.0f} | {peaks['grain']:,.0f} |")


def main(argv):
    del argv
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as root:
        {"throughput": throughput, "accuracy": accuracy, "memory": memory}[_WHAT.value](root)


if __name__ == "__main__":
    app.run(main)
