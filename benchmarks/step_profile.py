"""Where a compiled training step's time goes: per layer and pass, then per XLA op.

    python -m benchmarks.step_profile --config configs/default.py --steps 20

Traces one call of the compiled loop that ``train.py`` runs (``--steps``
steps on real batches, the host gather included)
with the JAX profiler, sums the time of every XLA:CPU op (thunk) in the
trace and charges each to a layer and a pass through the op's JAX name: a
Flax submodule (``Conv2D_1``, ``Dense_0``, ...) and forward (``jvp``) or
backward (``transpose(jvp)``). What no submodule claims (ReLU, pooling,
flatten, loss, and the fusions XLA builds across them) is "between layers";
what the model does not claim at all is the optimizer and the loop. A fusion
is charged to the op at its root. Times are ms per step on the thread that
runs each op; work an op hands to other threads (a GEMM split over both
cores) is not seen separately, and idle gaps are not counted, so the sum is
not the wall time, which is printed too.

With ``--torch`` (the default), ``benchmarks.torch_profile`` profiles the same
CNN's eager PyTorch step in a child process, and the layer table gains
PyTorch's ms per step beside ours.
"""

import collections
import glob
import json
import re
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import programs
from cnnflat_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to profile.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps in the traced call.")
_TOP = flags.DEFINE_integer("top", 15, "How many of the costliest ops to list.")
_TORCH = flags.DEFINE_boolean("torch", True, "Profile PyTorch's eager step too, in a child.")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) .*op_name="([^"]*)"')
# Control flow: its trace events enclose the ops it runs, which are counted.
_CONTROL_FLOW = re.compile(r" (?:while|conditional|call)\(")
_LAYER = re.compile(r"/((?:Conv2D|Dense)_\d+)/")


def charge(op_name):
    """``(layer, pass)`` of an HLO op from its JAX ``op_name`` metadata."""
    if "transpose(jvp(" in op_name:
        direction = "backward"
    elif "jvp(" in op_name:
        direction = "forward"
    else:
        return programs.OPTIMIZER, "-"
    layer = _LAYER.search(op_name)
    return (layer[1] if layer else programs.BETWEEN), direction


def torch_profile(argv):
    """``benchmarks.torch_profile``'s result, run in its own process."""
    config = [arg for arg in argv[1:] if arg.startswith("--config")]
    config += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    command = [sys.executable, "-m", "benchmarks.torch_profile", f"--steps={_STEPS.value}", *config]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def thunk_times(trace_dir):
    """Total picoseconds per op name over the XLA:CPU worker threads of a trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # Only this script needs it.

    space = xplane_pb2.XSpace()
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                totals[names.get(event.metadata_id, "?")] += event.duration_ps
    return totals


def main(_):
    config = _CONFIG.value
    data = input_pipeline.load_data(config, data_shards=1)
    training = programs.training(config, data, loop="compiled", steps=_STEPS.value)
    compiled = training.program.compiled
    ops = {}
    for line in compiled.as_text().splitlines():
        match = _OP_NAME.match(line)
        if match and not _CONTROL_FLOW.search(line):
            ops[match[1]] = (match[2], match[3])
    training.run(0)  # Warm-up.
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            training.run(1)
        wall_ms = (time.perf_counter() - start) * 1000 / _STEPS.value
        totals = thunk_times(trace_dir)
    per_step = {name: ps / 1e9 / _STEPS.value for name, ps in totals.items() if name in ops}
    by_layer = collections.Counter()
    for name, ms in per_step.items():
        by_layer[charge(ops[name][1])] += ms
    op_ms = sum(per_step.values())
    print(f"\n{_STEPS.value} steps at batch {config.batch_size}, {jax.devices()[0].device_kind}; "
          f"wall {wall_ms:.1f} ms per step while traced, ops {op_ms:.1f} ms")  # fmt: skip
    theirs = {}
    if _TORCH.value:
        result = torch_profile(sys.argv)
        theirs = {(layer, direction): ms for layer, direction, ms in result["rows"]}
        print(f"PyTorch eager: wall {result['wall_ms']:.1f} ms per step while profiled, "
              f"ops {sum(theirs.values()):.1f} ms")  # fmt: skip
    print("| layer | pass | ours ms per step | share | PyTorch ms per step | ours / PyTorch |")
    print("|---|---|---|---|---|---|")
    for key in sorted(set(by_layer) | set(theirs)):
        ours, torch_ms = by_layer.get(key, 0.0), theirs.get(key)
        vs = f"{torch_ms:.2f} | {ours / torch_ms:.2f}" if torch_ms else "- | -"
        print(f"| {key[0]} | {key[1]} | {ours:.2f} | {ours / op_ms:.0%} | {vs} |")
    print("\n| XLA op | shape | layer, pass | ms per step |\n|---|---|---|---|")
    for name, ms in collections.Counter(per_step).most_common(_TOP.value):
        shape, op_name = ops[name]
        print(f"| {name} | {shape} | {', '.join(charge(op_name))} | {ms:.2f} |")


if __name__ == "__main__":
    app.run(main)
