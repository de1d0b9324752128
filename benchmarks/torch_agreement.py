"""A model trained by ``train.py``, exported to PyTorch: the same predictions on the test set.

    python train.py --config configs/pytorch_net.py --workdir runs/pytorch_net
    python -m benchmarks.torch_agreement --workdir runs/pytorch_net

Reads the run's ``config.json`` and ``final_params/`` (``interop.from_workdir``),
exports the model with ``interop.to_torch``, saves its ``state_dict`` beside
the run (``torch_model.pt``), loads that file back into the exported
architecture as a PyTorch user would, and scores the run's test split in both
frameworks (PyTorch in eval mode, NCHW input). Prints each one's test
accuracy, the fraction of images on which their predicted classes agree,
and the largest difference between their outputs.
"""

import os

import jax
import ml_collections
import numpy as np
from absl import app, flags

from cnnflat_jax.data import input_pipeline
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import interop
from cnnflat_jax.train import train_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished train.py run.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 1000, "Images per forward pass.")


def main(_):
    import torch  # Only this script needs it.

    workdir = _WORKDIR.value
    config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
    data = input_pipeline.load_data(config, data_shards=1)
    ported = interop.from_workdir(workdir)
    path = os.path.join(workdir, "torch_model.pt")
    torch.save(interop.to_torch(ported).state_dict(), path)
    net = interop.to_torch(ported)  # The architecture; the weights come from the file.
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()
    ours, theirs = [], []
    for i in range(0, len(data.test_labels), _BATCH.value):
        images = data.test_images[i : i + _BATCH.value]
        ours.append(np.asarray(ported.apply(train_lib.normalize_images(images))))
        nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        with torch.no_grad():
            theirs.append(net(nchw).numpy())
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    final = ported.specs()[-1]
    if final in ("softmax", "log_softmax"):  # PyTorch applies it; ours gives logits.
        ours = np.asarray(getattr(jax.nn, final)(ours))
    labels = data.test_labels
    print(f"{len(labels)} test images of {config.dataset}; model {ported.specs()}")
    print("| framework | test accuracy |\n|---|---|")
    print(f"| cnnflat_jax | {np.mean(ours.argmax(1) == labels):.4f} |")
    accuracy = np.mean(theirs.argmax(1) == labels)
    print(f"| PyTorch {torch.__version__} (from {path}) | {accuracy:.4f} |")
    agree = np.mean(ours.argmax(1) == theirs.argmax(1))
    print(f"predicted classes agree on {agree:.4%} of the images; "
          f"largest output difference {np.abs(ours - theirs).max():.2e}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
