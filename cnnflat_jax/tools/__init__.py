"""The commands: train (``train_command``), and what works on a finished run: export,
predict, explain, Keras/PyTorch interop."""
