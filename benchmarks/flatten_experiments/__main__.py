"""``python -m benchmarks.flatten_experiments``: the suite (``suite.py``)."""

from absl import app

from benchmarks.flatten_experiments import suite

app.run(suite.main)
