"""Seconds-long run for tests: 2,000 Fashion-MNIST training images, 1 epoch.

The last of its 16 batches is partial (80 images).

    python train.py --config configs/smoke.py --workdir /tmp/smoke
"""

from cnnflat_jax.configs import default


def get_config():
    config = default.get_config()
    config.num_train_examples = 2000
    config.num_test_examples = 1000
    config.model.conv_features = (8, 16)
    config.model.dense_features = (32,)
    config.num_epochs = 1
    config.warmup_epochs = 0.0
    config.eval_batch_size = 500
    config.steps_per_dispatch = 4
    config.progress_bar = False
    return config
