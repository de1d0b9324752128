"""Where convolution time goes: each conv of the default CNN, per pass and lowering.

    python -m benchmarks.conv_profile --rounds 5

Times, at batch 128, the forward pass, the input gradient and the kernel
gradient of conv1 (28x28, 1->32) and conv2 (14x14, 32->64), for each
`ops.conv2d` lowering, both as a plain jitted call and inside a `lax.scan`
of 4 iterations (as the compiled training loop runs them). Medians in ms per
call.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from cnnflat_jax.nn import ops

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; medians are reported.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_SCAN_LENGTH = 4
LAYERS = {"conv1 28x28 1->32": (28, 1, 32), "conv2 14x14 32->64": (14, 32, 64)}


def passes(lowering):
    def forward(x, k):
        return ops.conv2d(x, k, lowering=lowering)

    def input_grad(x, k):
        return jax.grad(lambda x: jnp.sum(forward(x, k) * x.mean()))(x)

    def kernel_grad(x, k):
        return jax.grad(lambda k: jnp.sum(forward(x, k)))(k)

    return {"forward": forward, "fwd + input grad": input_grad, "fwd + kernel grad": kernel_grad}


def in_scan(fn):
    def run(x, k):
        def body(carry, _):
            out = fn(x + carry, k)
            return carry + 1e-9 * jnp.mean(out), None

        return jax.lax.scan(body, jnp.zeros((), x.dtype), None, length=_SCAN_LENGTH)[0]

    return run


def median_ms(fn, args, calls):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_ROUNDS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1000 / calls)
    return statistics.median(times)


def main(_):
    key = jax.random.key(0)
    print(f"batch {_BATCH.value}, {jax.devices()[0].device_kind}, medians of {_ROUNDS.value}, ms")
    lowerings = ("lax", "nhwc_grads", "im2col")
    print(
        "| layer | pass | "
        + " | ".join(lowerings)
        + " | "
        + " | ".join(f"{low} in scan" for low in lowerings)
        + " |"
    )
    print("|---|---|" + "---|" * (2 * len(lowerings)))
    for layer, (size, c_in, c_out) in LAYERS.items():
        x = jax.random.normal(key, (_BATCH.value, size, size, c_in))
        k = jax.random.normal(key, (3, 3, c_in, c_out)) * 0.1
        by_lowering = {low: passes(low) for low in lowerings}
        for name in by_lowering["lax"]:
            cells = [median_ms(jax.jit(by_lowering[low][name]), (x, k), 1) for low in by_lowering]
            cells += [
                median_ms(jax.jit(in_scan(by_lowering[low][name])), (x, k), _SCAN_LENGTH)
                for low in by_lowering
            ]
            print(f"| {layer} | {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    app.run(main)
