"""Default: the classic CNN on Fashion-MNIST, Adam with warmup + cosine decay.

python train.py --config configs/default.py --workdir runs/default

Every field, its default and its rule are one table: ``cnnflat_jax/config.py``
(``FIELDS`` and ``MODEL_FIELDS``). The other configs here import this one and
override a few fields.
"""

import ml_collections

from cnnflat_jax import config


def get_config() -> ml_collections.ConfigDict:
    return config.defaults()
