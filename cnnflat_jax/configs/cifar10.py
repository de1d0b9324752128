"""A wider CNN on CIFAR-10 (32x32x3; TFDS downloads it).

python train.py --config configs/cifar10.py --workdir runs/cifar10
"""

from cnnflat_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar10"
    config.model.conv_features = (64, 128, 256)
    config.model.dense_features = (512,)
    config.learning_rate = 1e-3
    config.num_epochs = 30
    return config
