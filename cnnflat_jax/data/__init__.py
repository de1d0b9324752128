"""Datasets -> arrays or streamed records, and the batches of an epoch."""
