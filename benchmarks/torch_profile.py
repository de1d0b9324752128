"""PyTorch's side of ``step_profile``: the same CNN's training step, per layer and pass.

    python -m benchmarks.torch_profile --config configs/default.py --steps 20

Exports the config's CNN with ``interop.to_torch`` (our initial weights, the
same ``nn.Sequential`` that ``speed_comparison`` trains eagerly) and profiles
``--steps`` eager Adam steps on real batches with ``torch.profiler``. Each
layer's forward is the ``record_function`` range around its module; its
backward is the autograd-engine events whose sequence numbers match the
forward ops inside that range. Layers are named as Flax names ours
(``Conv2D_0``, ``Dense_1``, ...), so ``step_profile --torch`` can put the two
side by side; ReLU, pooling, flatten and the loss are "between layers", the
Adam step and the gradient accumulation "optimizer". Prints one JSON line:
ms per step for each ``[layer, pass]`` and the wall ms per step.
"""

import collections
import json
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.programs import BETWEEN, OPTIMIZER

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config to profile.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps in the profiled run.")
_BACKWARD = "autograd::engine::evaluate_function: "


def torch_net(config, data):
    """``interop.to_torch`` of the config's freshly initialised CNN, and flax-style layer names."""
    import jax
    import jax.numpy as jnp

    from cnnflat_jax.nn import models
    from cnnflat_jax.tools import interop

    model = models.from_fields(config.model, data.num_classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, *data.image_shape)))["params"]
    fields = config.model.to_dict()
    ported = interop.Ported(fields, data.num_classes, data.image_shape, jax.device_get(params))
    net = interop.to_torch(ported)
    counts, names = collections.Counter(), []
    for module in net:
        kind = {"Conv2d": "Conv2D", "Linear": "Dense"}.get(type(module).__name__)
        names.append(f"{kind}_{counts[kind]}" if kind else BETWEEN)
        counts[kind] += 1
    return net, names


def ranged(torch):
    class Ranged(torch.nn.Module):
        """``module`` inside a profiler range named ``name``."""

        def __init__(self, name, module):
            super().__init__()
            self.name, self.module = name, module

        def forward(self, x):
            with torch.profiler.record_function(self.name):
                return self.module(x)

    return Ranged


def charge(events, names):
    """ms totals per ``(layer, pass)`` from the profiler's events."""
    layer_of_sequence, totals = {}, collections.Counter()
    for event in events:
        if event.name.startswith("layer "):
            index = int(event.name.split()[1])
            totals[names[index], "forward"] += event.cpu_time_total
            for child in _descendants(event):
                if child.sequence_nr >= 0:
                    layer_of_sequence[child.sequence_nr] = names[index]
        elif event.name == "cross_entropy":
            totals[BETWEEN, "forward"] += event.cpu_time_total
        elif event.name.startswith("Optimizer.step") or "AccumulateGrad" in event.name:
            totals[OPTIMIZER, "-"] += event.cpu_time_total
    for event in events:
        if event.name.startswith(_BACKWARD) and "AccumulateGrad" not in event.name:
            layer = layer_of_sequence.get(event.sequence_nr, BETWEEN)
            totals[layer, "backward"] += event.cpu_time_total
    return {key: us / 1000 for key, us in totals.items()}


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def main(_):
    import jax
    import torch
    import torch.nn.functional as F

    from cnnflat_jax.data import batching, input_pipeline

    config = _CONFIG.value
    data = input_pipeline.load_data(config, data_shards=1)
    net, names = torch_net(config, data)
    Ranged = ranged(torch)
    timed = torch.nn.Sequential(*(Ranged(f"layer {i}", module) for i, module in enumerate(net)))
    optimizer = torch.optim.Adam(net.parameters(), config.learning_rate)
    indices, mask = batching.epoch_plan(
        jax.random.key(1), 1, len(data.train.labels), config.batch_size, _STEPS.value
    )
    batches = batching.gather_batches(data.train.images, data.train.labels, indices[0], mask[0])
    images = torch.from_numpy(batches["image"].transpose(0, 1, 4, 2, 3).astype(np.float32) / 255)
    labels = torch.from_numpy(batches["label"].astype(np.int64))

    def train():
        for image, label in zip(images, labels):
            optimizer.zero_grad(set_to_none=True)
            logits = timed(image)
            with torch.profiler.record_function("cross_entropy"):
                loss = F.cross_entropy(logits, label)
            loss.backward()
            optimizer.step()

    train()  # Warm-up.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        train()
        wall_ms = (time.perf_counter() - start) * 1000 / _STEPS.value
    totals = charge(profile.events(), names)
    rows = [[layer, direction, ms / _STEPS.value] for (layer, direction), ms in totals.items()]
    print("RESULT " + json.dumps({"rows": rows, "wall_ms": wall_ms}))


if __name__ == "__main__":
    app.run(main)
