"""The default CNN on MNIST (TFDS downloads it; or --config.idx_dir=DIR).

python train.py --config configs/mnist.py --workdir runs/mnist
"""

from cnnflat_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "mnist"
    config.num_epochs = 5
    return config
