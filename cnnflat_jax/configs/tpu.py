"""The default CNN on a Cloud TPU slice, one host or many, with a gs:// workdir.

Check it for a slice first, on any machine (docs/guide/cloud_tpu.md):

    python -m cnnflat_jax.tpu_check --config configs/tpu.py --topology v5e:4x4

then, on every worker of the slice:

    python train.py --config configs/tpu.py --workdir gs://BUCKET/runs/tpu \\
        --coordinator_address=auto

The choices, from the check's numbers (configs/tpu.py on a v5e-16 and a v5p-8):
- batch_size 1024: it splits over 4, 8, 16, 32 or 64 chips. Memory does not
  bound it (the training program holds 39 MiB of a v5e chip's 16 GiB), but
  Fashion-MNIST does: 1024 already leaves only 59 steps an epoch, and each
  v5e-16 chip works on 64 images a step, far below what saturates it (the
  compiled step is 1.8 GFLOP a chip, about 9 us at the chip's peak).
- learning_rate 4e-3: Adam's 2e-3 at batch 128, raised for a batch 8 times
  larger by less than the square-root rule's 5.7e-3 (not tuned on a TPU).
- steps_per_dispatch 59: one whole epoch per program call, so the host's
  Python runs once an epoch instead of once a step (the steps themselves
  are microseconds long on a TPU).
- eval_batch_size 2048: 128 images a chip on a v5e-16; the 10,000 test
  images in 5 calls of a 6 MiB program.
"""

from cnnflat_jax.configs import default


def get_config():
    config = default.get_config()
    config.data_source = "tfds"
    config.batch_size = 1024
    config.learning_rate = 4e-3
    config.eval_batch_size = 2048
    config.num_epochs = 20
    config.steps_per_dispatch = 59
    config.checkpoint_every_steps = 590
    config.progress_bar = False
    return config
