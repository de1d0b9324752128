"""Any stack of layers from the command line: the default run with a ``sequential`` model.

    python train.py --config configs/sequential.py --workdir runs/gap \
      --config.model.layers='("conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu",
                              "global_avg_pool", "dense:10")'

The layers default to the default config's CNN written as specs (the same
network: the same parameters and the same metrics for a seed). The specs
are in ``cnnflat_jax/nn/layers.py``.
"""

import ml_collections

from cnnflat_jax.configs import default

CNN = (
    "conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2",
    "flatten", "dense:256", "relu", "dense:10",
)  # fmt: skip


def get_config():
    config = default.get_config()
    config.model = ml_collections.ConfigDict(
        dict(name="sequential", layers=CNN, conv_lowering="auto")
    )
    return config
