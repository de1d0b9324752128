"""The default CNN on a Cloud TPU VM or a multi-host TPU slice.

One host (e.g. v5litepod-8), on the VM:

    python train.py --config configs/tpu.py --workdir /mnt/runs/tpu

A multi-host slice (e.g. v4-32), the same command on every worker, with
``--coordinator_address=auto`` so JAX finds the other hosts itself and a
workdir that every host sees (a gcsfuse-mounted bucket):

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
      "cd cnnflat_jax && python train.py --config configs/tpu.py \\
       --workdir /mnt/bucket/runs/tpu --coordinator_address=auto"

Each host reads only its own shard of Fashion-MNIST through TFDS.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data_source = "tfds"
    # A global batch that splits over 8, 16, 32, ... chips, and a higher Adam rate for it
    # (not tuned: no TPU was available to this project's tests).
    config.batch_size = 1024
    config.learning_rate = 4e-3
    config.eval_batch_size = 2048
    config.num_epochs = 20
    config.steps_per_dispatch = 59  # One epoch of 60,000 images per program call.
    config.checkpoint_every_steps = 590
    config.progress_bar = False
    return config
