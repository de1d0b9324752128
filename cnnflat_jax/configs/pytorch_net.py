"""The pytorch/examples MNIST ``Net`` as a layer spec, trained on Fashion-MNIST.

    python train.py --config configs/pytorch_net.py --workdir runs/pytorch_net

``Net`` from pytorch/examples ``mnist/main.py``: conv(1->32, 3) -> relu ->
conv(32->64, 3) -> relu -> max_pool2d(2) -> dropout(0.25) -> flatten ->
fc(9216->128) -> relu -> dropout(0.5) -> fc(128->10) -> log_softmax
(1,199,882 parameters). PyTorch's convs pad nothing: "valid". The 9216 is
not written down; it comes from the shapes. The recipe is the default
config's (Adam, warmup then cosine decay), for 5 epochs.
"""

import ml_collections

from cnnflat_jax.configs import default

NET = (
    "conv:32:3:padding=valid", "relu", "conv:64:3:padding=valid", "relu", "max_pool:2",
    "dropout:0.25", "flatten", "dense:128", "relu", "dropout:0.5", "dense:10", "log_softmax",
)  # fmt: skip


def get_config():
    config = default.get_config()
    config.model = ml_collections.ConfigDict(dict(name="sequential", layers=NET))
    config.num_epochs = 5
    return config
