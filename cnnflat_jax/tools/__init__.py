"""What works on a finished run: export, predict, explain, Keras/PyTorch interop."""
