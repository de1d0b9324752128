"""Side by side: the default CNN's training speed in every implementation we have.

    python -m benchmarks.speed_comparison --config configs/default.py --rounds 5

One process, the same real Fashion-MNIST batches (batch 128, Adam), and in
every round each implementation trains ``--steps`` steps, one after the
other, so each ratio is measured under the same machine load. Rows:

- the Flax example's way: ``flax.linen`` Conv/max_pool/Dense, one jitted
  step per batch from a Python loop (the reference, ratio 1.00);
- our per-step loop (``train_lib.build_train(loop="per_step")``, the first
  lowering), as ``train.py`` builds it;
- our compiled loop (``loop="compiled"``, ``lax.scan`` over the steps) with
  each ``ops.conv2d`` lowering;
- PyTorch eager and ``torch.compile(model)`` (skipped if torch is missing).

Reports training images/s (median over rounds), the ratio to the Flax example
and to ``torch.compile`` (both medians of the per-round ratios), the compile
time of each JAX program, and eval images/s of the first lowering. On CPU
the ``lax`` compiled loop takes ~2 s per step (JAX's transposed convolutions
inside ``lax.scan``), most of the ~15 minutes a run takes; leave it out of
``--lowerings`` for a quick look.
"""

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import programs
from cnnflat_jax import batching, input_pipeline, interop, models

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps per implementation per round.")
_LOWERINGS = flags.DEFINE_list(
    "lowerings", ["hybrid", "im2col", "nhwc_grads", "lax"], "ops.conv2d lowerings to time."
)
_TORCH = flags.DEFINE_boolean("torch", True, "Also time PyTorch eager and torch.compile.")


class FlaxExampleCNN(nn.Module):
    """``config.model``'s CNN written as the Flax examples write it (nn.Conv, nn.max_pool)."""

    fields: dict
    num_classes: int

    @nn.compact
    def __call__(self, x):
        size, window = self.fields["kernel_size"], self.fields["pool_window"]
        for features in self.fields["conv_features"]:
            x = nn.relu(nn.Conv(features, (size, size))(x))
            x = nn.max_pool(x, (window, window), (window, window))
        x = x.reshape(x.shape[0], -1)
        for features in self.fields["dense_features"]:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)


def flax_example_runner(images, labels, learning_rate, fields, num_classes):
    """A Python loop over one jitted step, as in flax/examples/mnist."""
    model = FlaxExampleCNN(fields, num_classes)
    tx = optax.adam(learning_rate)
    params = model.init(jax.random.key(0), jnp.zeros((1, *images.shape[2:])))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, image, label):
        def loss_fn(params):
            logits = model.apply({"params": params}, image.astype(jnp.float32) / 255.0)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    start = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, images[0], labels[0]))
    compile_sec = time.perf_counter() - start

    def run():
        nonlocal params, opt_state
        for image, label in zip(images, labels):
            params, opt_state = step(params, opt_state, image, label)
        jax.block_until_ready(params)

    return run, compile_sec


def our_runners(config, data, lowering):
    """Our compiled loop (and, for the first lowering, per-step loop and eval), as
    ``train.py`` builds them (``benchmarks.programs``)."""
    config = config.copy_and_resolve_references()
    config.model.conv_lowering = lowering
    loops = ["compiled"] if lowering != _LOWERINGS.value[0] else ["per_step", "compiled"]
    names = {"compiled": "compiled loop", "per_step": "per-step loop"}
    runners, compile_sec = {}, {}
    for loop in loops:
        training = programs.training(config, data, loop=loop, steps=_STEPS.value)
        runners[f"{names[loop]}, {lowering}"] = lambda training=training: training.run(1)
        compile_sec[loop] = training.compile_sec
    if lowering != _LOWERINGS.value[0]:
        return runners, compile_sec, None
    evaluate, _ = programs.evaluation(config, data, training.state)
    return runners, compile_sec, lambda: jax.block_until_ready(evaluate(training.state))


def torch_runners(images, labels, learning_rate, ported):
    """PyTorch eager and torch.compile(model) on the same batches (NCHW).

    The network is ``interop.to_torch(ported)``: our CNN, with our initial weights.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    runners, compile_sec = {}, {}
    for name, wrap in (("PyTorch eager", lambda m: m), ("torch.compile", torch.compile)):
        net = interop.to_torch(ported)
        forward = wrap(net)
        optimizer = torch.optim.Adam(net.parameters(), learning_rate)

        def run(forward=forward, optimizer=optimizer):
            for image, label in zip(x, y):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(forward(image), label).backward()
                optimizer.step()

        start = time.perf_counter()
        run()  # Warm-up (and, for torch.compile, compilation).
        compile_sec[name] = time.perf_counter() - start
        runners[name] = run
    return runners, compile_sec


def main(_):
    config = _CONFIG.value
    fields = config.model.to_dict()
    if (fields["name"], fields["pool"], fields["padding"]) != ("cnn", "max", "SAME"):
        raise app.UsageError("speed_comparison times a CNN with max pooling and SAME padding")
    data = input_pipeline.load_data(config, data_shards=1)
    indices, mask = batching.epoch_plan(
        jax.random.key(1), 1, len(data.train_labels), config.batch_size, _STEPS.value
    )
    batches = batching.gather_batches(data.train_images, data.train_labels, indices[0], mask[0])
    images, labels = batches["image"], batches["label"]

    flax_run, flax_compile = flax_example_runner(
        images, labels, config.learning_rate, fields, data.num_classes
    )
    runners = {"Flax example (nn.Conv, jit step)": flax_run}
    compile_sec = {"Flax example step": flax_compile}
    run_eval = None
    for lowering in _LOWERINGS.value:
        more, seconds, eval_fn = our_runners(config, data, lowering)
        runners.update(more)
        for kind, sec in seconds.items():
            compile_sec[f"{kind}, {lowering}"] = sec
        run_eval = run_eval or eval_fn
    if _TORCH.value:
        model = models.from_fields(config.model, data.num_classes)
        params = model.init(jax.random.key(0), jnp.zeros((1, *data.image_shape)))["params"]
        ported = interop.Ported(fields, data.num_classes, data.image_shape, jax.device_get(params))
        more, seconds = torch_runners(images, labels, config.learning_rate, ported)
        runners.update(more)
        compile_sec.update({f"{name} warm-up": sec for name, sec in seconds.items()})

    for run in runners.values():  # Warm-up.
        run()
    rates = {name: [] for name in runners}
    eval_rates = []
    for _ in range(_ROUNDS.value):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            rates[name].append(_STEPS.value * config.batch_size / (time.perf_counter() - start))
        start = time.perf_counter()
        run_eval()
        eval_rates.append(len(data.test_labels) / (time.perf_counter() - start))

    def ratio_to(reference):
        if reference not in rates:
            return {}
        return {
            name: statistics.median(a / b for a, b in zip(values, rates[reference]))
            for name, values in rates.items()
        }

    to_flax, to_torch = ratio_to(next(iter(rates))), ratio_to("torch.compile")
    print(
        f"\nDefault CNN, batch {config.batch_size}, {_ROUNDS.value} rounds x {_STEPS.value} "
        f"steps, {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    print("| implementation | train images/s | vs Flax example | vs torch.compile |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        vs_torch = f"{to_torch[name]:.2f}" if to_torch else "-"
        print(f"| {name} | {statistics.median(values):.0f} | {to_flax[name]:.2f} | {vs_torch} |")
    print(f"\neval images/s ({_LOWERINGS.value[0]}): {statistics.median(eval_rates):.0f}")
    print("| program | compile or warm-up s |\n|---|---|")
    for name, sec in compile_sec.items():
        print(f"| {name} | {sec:.2f} |")


if __name__ == "__main__":
    app.run(main)
