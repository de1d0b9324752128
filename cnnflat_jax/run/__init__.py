"""A run of train.py: the trainer, its run directory, checkpoints and reports."""
