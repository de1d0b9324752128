"""The default CNN's training and eval speed in every implementation, each in its own process.

    python -m benchmarks.speed_comparison --config configs/default.py --rounds 5

Two CNNs, the config's with max pooling and the same with average pooling
(``--pools max,avg``): PyTorch's fastest mode differs between them (Inductor
is slow at ``max_pool2d``'s backward on CPU), and a user choosing between the
frameworks compares against PyTorch's best for the model at hand.

XLA's and PyTorch's worker threads keep spinning after their work and take
the cores from whatever runs next in the same process, so every row runs in
a fresh Python process, every round, with each framework's default threads:

- ``train.py``: the command users run (2 epochs); its epoch-2 ``images_per_sec``
  from ``metrics.jsonl``, which includes the host gather of every dispatch.
- ours, compiled step: the program ``train.py`` compiles
  (``benchmarks.programs``), ``--steps`` steps per call, host gather included.
- the Flax example's CNN and step: ``nn.Conv``/``nn.max_pool``/``nn.Dense``,
  one jitted step per batch from a Python loop, as in flax/examples/mnist.
- PyTorch eager, and ``torch.compile(model)``: our CNN exported by
  ``interop.to_torch`` (the same weights; ``max_pool2d`` or ``avg_pool2d``),
  a plain Python loop.

All train on real Fashion-MNIST batches of ``config.batch_size`` with Adam at
``config.learning_rate``; eval scores the whole test split in batches of
``config.eval_batch_size``. The row order rotates each round. Reports, per
CNN, each row's median images/s, the median over rounds of the per-round ratio
of ours (``train.py`` and the compiled step) to that row, and the median of
``train.py`` / PyTorch's best, the faster of eager and ``torch.compile`` in
the same round.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cnnflat_jax.run import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; each runs every row once, in a new order.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps per timed call.")
_CALLS = flags.DEFINE_integer("calls", 5, "Timed calls per row per round (after one warm-up).")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time PyTorch eager and torch.compile.")
_POOLS = flags.DEFINE_list("pools", ["max", "avg"], "The CNNs: config.model.pool of each.")
_ROW = flags.DEFINE_string("row", "", "Internal: run this one row and print its result.")

TRAIN_PY = "train.py"
OURS = "ours, compiled step"
FLAX = "Flax example (nn.Conv, jitted step)"
EAGER = "PyTorch eager"
COMPILE = "torch.compile"


def timed(fn, calls: int) -> float:
    """Median seconds of ``calls`` calls of ``fn`` (which waits for its results)."""
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(train, evaluate) -> dict:
    """A warm-up call of each (compiling), then the median seconds of each."""
    start = time.perf_counter()
    train()
    evaluate()
    warmup = time.perf_counter() - start
    return {
        "train_step_sec": timed(train, _CALLS.value) / _STEPS.value,
        "eval_sec": timed(evaluate, 3),
        "warmup_sec": warmup,
    }


def training_batches(config, data):
    """The first ``--steps`` batches of epoch 1, gathered as train.py does."""
    import jax

    from cnnflat_jax.data import batching

    indices, mask = batching.epoch_plan(
        jax.random.key(1), 1, len(data.train.labels), config.batch_size, _STEPS.value
    )
    return batching.gather_batches(data.train.images, data.train.labels, indices[0], mask[0])


def measure_ours(config, data) -> dict:
    import jax

    from benchmarks import programs

    start = time.perf_counter()
    training = programs.training(config, data, loop="compiled", steps=_STEPS.value)
    evaluate, _ = programs.eval_program(config, data, training.state)
    build_sec = time.perf_counter() - start
    calls = iter(range(1 + _CALLS.value))  # A new dispatch of the epoch for every call.
    result = measure(
        lambda: training.run(next(calls)),
        lambda: jax.block_until_ready(evaluate(training.state)),
    )
    result["warmup_sec"] += build_sec  # Compilation is part of ours' warm-up too.
    return result


def measure_flax(config, data) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    fields = config.model.to_dict()
    size, window = fields["kernel_size"], fields["pool_window"]
    pool = {"max": nn.max_pool, "avg": nn.avg_pool}[fields["pool"]]

    class FlaxExampleCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for features in fields["conv_features"]:
                x = nn.relu(nn.Conv(features, (size, size))(x))
                x = pool(x, (window, window), (window, window))
            x = x.reshape(x.shape[0], -1)
            for features in fields["dense_features"]:
                x = nn.relu(nn.Dense(features)(x))
            return nn.Dense(data.num_classes)(x)

    model, tx = FlaxExampleCNN(), optax.adam(config.learning_rate)
    params = model.init(jax.random.key(0), jnp.zeros((1, *data.image_shape)))["params"]
    state = {"params": params, "opt": tx.init(params)}

    @jax.jit
    def train_step(params, opt_state, image, label):
        def loss_fn(params):
            logits = model.apply({"params": params}, image.astype(jnp.float32) / 255.0)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def eval_step(params, image, label):
        logits = model.apply({"params": params}, image.astype(jnp.float32) / 255.0)
        return jnp.sum(jnp.argmax(logits, -1) == label)

    batches = training_batches(config, data)
    test = eval_batches(config, data)

    def train():
        for image, label in zip(batches["image"], batches["label"]):
            state["params"], state["opt"] = train_step(state["params"], state["opt"], image, label)
        jax.block_until_ready(state["params"])

    def evaluate():
        return sum(int(eval_step(state["params"], x, y)) for x, y in test)

    return measure(train, evaluate)


def eval_batches(config, data):
    size = config.eval_batch_size
    return [
        (data.test_images[i : i + size], data.test_labels[i : i + size])
        for i in range(0, len(data.test_labels), size)
    ]


def measure_torch(config, data, compiled: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from cnnflat_jax.nn import models
    from cnnflat_jax.tools import interop

    model = models.from_fields(config.model, data.num_classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, *data.image_shape)))["params"]
    fields = config.model.to_dict()
    ported = interop.Ported(fields, data.num_classes, data.image_shape, jax.device_get(params))
    net = interop.to_torch(ported)
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.Adam(net.parameters(), config.learning_rate)

    def nchw(images):
        return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)

    batches = training_batches(config, data)
    images = [nchw(x) for x in batches["image"]]
    labels = [torch.from_numpy(y.astype(np.int64)) for y in batches["label"]]
    test = [(nchw(x), torch.from_numpy(y.astype(np.int64))) for x, y in eval_batches(config, data)]

    def train():
        net.train()
        for image, label in zip(images, labels):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(forward(image), label).backward()
            optimizer.step()

    def evaluate():
        net.eval()
        with torch.no_grad():
            return sum(int((forward(x).argmax(1) == y).sum()) for x, y in test)

    return measure(train, evaluate)  # The warm-up compiles torch.compile's graphs.


def run_row(config) -> None:
    """The child process: measure ``--row`` and print one JSON line."""
    from cnnflat_jax.data import input_pipeline

    data = input_pipeline.load_data(config, data_shards=1)
    measure = {
        OURS: measure_ours,
        FLAX: measure_flax,
        EAGER: lambda c, d: measure_torch(c, d, compiled=False),
        COMPILE: lambda c, d: measure_torch(c, d, compiled=True),
    }[_ROW.value]
    result = measure(config, data)
    result["train_images_per_sec"] = config.batch_size / result.pop("train_step_sec")
    result["eval_images_per_sec"] = len(data.test_labels) / result.pop("eval_sec")
    print("RESULT " + json.dumps(result))


def config_flags_of(argv: list[str]) -> list[str]:
    """The ``--config`` flags in ``argv`` (the command line), to pass on to children."""
    passed = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            passed += [arg, argv[i + 1]]
        elif arg.startswith("--config"):
            passed.append(arg)
    return passed


def child(row: str, flags_: list[str]) -> dict:
    command = [sys.executable, "-m", "benchmarks.speed_comparison", f"--row={row}",
               f"--steps={_STEPS.value}", f"--calls={_CALLS.value}", *flags_]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"{row} failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def train_py(flags_: list[str]) -> dict:
    """``train.py`` as users run it, 2 epochs: epoch 2's images/s."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "train.py", *flags_, "--workdir", workdir,
                   "--config.num_epochs=2", "--config.progress_bar=False"]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if result.returncode:
            raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
        with open(workdir_lib.path(workdir, workdir_lib.METRICS)) as f:
            last = [json.loads(line) for line in f][-1]
    return {"train_images_per_sec": last["images_per_sec"], "wall_sec": time.perf_counter() - start}


def table(results: dict, rows: list[str]) -> str:
    """One CNN's table: median images/s per row, and medians of per-round ratios."""

    def median(row, key):
        values = [x[key] for x in results[row] if key in x]
        return statistics.median(values) if values else None

    def ratio(ours, row):
        return statistics.median(
            a["train_images_per_sec"] / b["train_images_per_sec"]
            for a, b in zip(results[ours], results[row])
        )

    def best_torch(round_):
        return max(results[row][round_]["train_images_per_sec"] for row in (EAGER, COMPILE))

    rounds = range(len(results[TRAIN_PY]))
    lines = [
        "| implementation | train images/s | train.py / it | compiled step / it "
        "| eval images/s | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        evaluation, warmup = median(row, "eval_images_per_sec"), median(row, "warmup_sec")
        lines.append(
            f"| {row} | {median(row, 'train_images_per_sec'):.0f} | {ratio(TRAIN_PY, row):.2f} "
            f"| {ratio(OURS, row):.2f} | {f'{evaluation:.0f}' if evaluation else '-'} "
            f"| {f'{warmup:.1f}' if warmup else '-'} |"
        )
    if COMPILE in rows:
        best = statistics.median(
            results[TRAIN_PY][r]["train_images_per_sec"] / best_torch(r) for r in rounds
        )
        lines.append(f"\ntrain.py / PyTorch's best (the faster of eager and torch.compile in "
                     f"each round), median: **{best:.2f}**")  # fmt: skip
    return "\n".join(lines)


def main(_):
    config = _CONFIG.value
    if _ROW.value:
        run_row(config)
        return
    import jax

    passed = config_flags_of(sys.argv)
    pools = {pool: [*passed, f"--config.model.pool={pool}"] for pool in _POOLS.value}
    rows = [TRAIN_PY, OURS, FLAX] + ([EAGER, COMPILE] if _TORCH.value else [])
    results = {pool: {row: [] for row in rows} for pool in pools}
    for r in range(_ROUNDS.value):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for pool, flags_ in pools.items():
            for row in order:
                run = train_py(flags_) if row == TRAIN_PY else child(row, flags_)
                results[pool][row].append(run)
            print(f"round {r}, {pool} pool: " + ", ".join(
                f"{row} {results[pool][row][-1]['train_images_per_sec']:.0f}" for row in order
            ), file=sys.stderr, flush=True)  # fmt: skip

    print(f"\nbatch {config.batch_size}, {_ROUNDS.value} rounds (rotated), each row in its own "
          f"process; {_STEPS.value} steps per call, {_CALLS.value} calls; jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")  # fmt: skip
    for pool in pools:
        print(f"\n### CNN, {pool} pool (config.model.pool={pool})\n")
        print(table(results[pool], rows))


if __name__ == "__main__":
    app.run(main)
