"""The CNN preset's defaults, as plain values: ``models.CNN``'s fields and the
config's model fields (``config.MODEL_FIELDS``) both read them here, and the
config reads them without loading Flax. Only the standard library is imported.

The classic MNIST network: conv32 -> pool -> conv64 -> pool -> flatten ->
dense 256 -> the classes.
"""

CNN = {
    "conv_features": (32, 64),
    "kernel_size": 3,
    "padding": "SAME",
    "pool": "max",
    "pool_window": 2,
    "dense_features": (256,),
    "permute_flat": False,
    "conv_lowering": "auto",  # How ops.conv2d computes; values are the same.
}
