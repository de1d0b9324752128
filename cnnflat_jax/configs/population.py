"""Four default CNNs in one program: learning rates 0.5x-4x the default.

Members share every batch; 5,000 training images are held out so the best
member is chosen on validation, not test, data.

    python train.py --config configs/population.py --workdir runs/population
"""

from cnnflat_jax.configs import default


def get_config():
    config = default.get_config()
    config.population.size = 4
    config.population.learning_rates = (1e-3, 2e-3, 4e-3, 8e-3)
    config.validation_examples = 5000
    return config
