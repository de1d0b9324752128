"""What each trained seed of a flatten variant leaves for the tables.

``measure_seed`` runs in the training process, on its core, right after the seed
trains, and its result is kept as the run's ``measures.json``: the seed's accuracy on
its own training images, which test images it gets right (the paired comparisons'
input) and, where asked, its sweeps (``sweeps``), its similarities under
shifts (``equivariance``) and its effective receptive field
(``receptive``). The tables then need the runs' small files only.
"""

from __future__ import annotations

import base64
import functools
import time

import numpy as np

from benchmarks.flatten_experiments import equivariance as shift_equivariance
from benchmarks.flatten_experiments import receptive, runs, sweeps
from cnnflat_jax.data import input_pipeline


@functools.cache
def _fashion(train_images: int, test_images: int) -> input_pipeline.Dataset:
    """The data, loaded once per process."""
    return runs.fashion(runs.Plan("", train_images=train_images, test_images=test_images))


def timed(function, *args) -> tuple:
    start = time.perf_counter()
    return function(*args), time.perf_counter() - start


def measure_seed(
    workdir: str, *, name: str, part: tuple[int, int], sweep: bool, equivariance: bool,
    field: bool,
) -> dict:  # fmt: skip
    """The seed of variant ``name`` trained in ``workdir``, on the data ``part``
    (``Plan.train_images``, ``Plan.test_images``): its train accuracy, its test images
    right (packed bits, base64), and if asked its sweeps, equivariance and field, each
    with its seconds (``*_sec``); ``sec``: the seconds of it all."""
    start = time.perf_counter()
    data = _fashion(*part)
    [classify] = runs.seed_classifiers([workdir])
    images, labels = runs.train_images(name, data)
    test = runs.test_images(name, data)
    right = classify(test) == data.test_labels
    result = {
        "train_accuracy": float(np.mean(classify(images) == labels)),
        "test_right": pack_right(right),
    }
    if sweep:
        result["sweeps"], result["sweeps_sec"] = timed(
            sweeps.sweep, classify, test, data.test_labels, float(np.mean(right))
        )
    if equivariance:
        result["equivariance"], result["equivariance_sec"] = timed(
            shift_equivariance.measure, workdir, test, data.test_labels
        )
    if field:
        gradient, result["field_sec"] = timed(receptive.field, workdir, test[: receptive.IMAGES])
        result["field"] = gradient.tolist()
    return {**result, "sec": time.perf_counter() - start}


def pack_right(right: np.ndarray) -> str:
    """Bool ``(images,)`` as text: packed bits (8 images a byte, first image highest), base64."""
    return base64.b64encode(np.packbits(right).tobytes()).decode()


def test_right(measures: dict, images: int) -> np.ndarray:
    """Bool ``(images,)``: which test images the measured seed gets right."""
    bits = np.frombuffer(base64.b64decode(measures["test_right"]), dtype=np.uint8)
    return np.unpackbits(bits)[:images].astype(bool)
