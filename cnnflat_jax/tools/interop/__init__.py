"""Ports models between cnnflat_jax, Keras 3 and PyTorch, flatten order included.

    from cnnflat_jax import interop

    ported = interop.load_keras("model.keras")    # or from_keras(keras_model)
    ported = interop.from_torch(torch_module, input_chw=(1, 28, 28))
    logits = ported.apply(images_NHWC)             # our models take NHWC
    keras_model = interop.to_keras(ported)
    torch_model = interop.to_torch(ported)         # .state_dict() to save

Any chain of the layers that ``models.Sequential`` runs ports both ways:
convolutions (stride, dilation, same/valid/explicit padding), ReLU, max and
average pooling (window, stride, padding), global average pooling, flatten,
dense, dropout, and a final softmax or log-softmax. A model that matches the
``cnn`` or ``mlp`` preset comes back as that preset's fields; any other as
``{"name": "sequential", "layers": (...)}``.

Every weight moves by an exact transpose or permutation:

- conv kernels: Keras HWIO is ours; PyTorch OIHW -> HWIO.
- dense kernels: Keras ``(in, out)`` is ours; PyTorch ``(out, in)`` -> ``(in, out)``.
- the first dense kernel after the flatten: PyTorch flattens NCHW maps in
  ``(c, h, w)`` order, and so does Keras when channels_first maps meet a
  channels_last ``Flatten``; ours is ``(h, w, c)``, so its rows are reordered
  with ``ops.reorder_flat_kernel``. Forgetting this step is the classic
  porting bug: the network runs and predicts garbage.

Keras and PyTorch are imported only by the functions that use them, so
``import cnnflat_jax.interop`` needs neither. Files are read without
unpickling arbitrary objects: Keras's ``safe_mode`` and
``torch.load(weights_only=True)``.
"""

from cnnflat_jax.tools.interop.keras import SUPPORTED_KERAS, from_keras, load_keras, to_keras
from cnnflat_jax.tools.interop.ported import Ported, UnsupportedModelError, from_workdir
from cnnflat_jax.tools.interop.torch import (
    SUPPORTED_TORCH,
    from_torch,
    from_torch_state_dict,
    load_torch,
    to_torch,
)

__all__ = [
    "SUPPORTED_KERAS",
    "SUPPORTED_TORCH",
    "Ported",
    "UnsupportedModelError",
    "from_keras",
    "from_torch",
    "from_torch_state_dict",
    "from_workdir",
    "load_keras",
    "load_torch",
    "to_keras",
    "to_torch",
]
