"""What each trained seed of a flatten variant leaves for the tables, and its test
accuracy under shifts and deformations.

``measure_seed`` runs in the training process, on its core, right after the seed
trains: its accuracy on its own training images, which test images it gets right
(the paired comparisons' input) and, for the swept variants' first ``Plan.seeds``
seeds, the sweeps: every shift of 0-8 pixels in x, y and diagonally (the CNN's total
stride is 4), rotation, horizontal shear, scale and elastic deformation, each at a few
levels; zero fill, bilinear resampling, all test images. ``swept`` gathers a variant's
sweeps from its seeds.
"""

from __future__ import annotations

import base64
import functools
import time

import numpy as np

from benchmarks import flatten_runs as runs
from cnnflat_jax.data import input_pipeline, transforms

SHIFTS = tuple(range(9))  # Pixels.
DIRECTIONS = {"x": (0, 1), "y": (1, 0), "diagonal": (1, 1)}  # (rows down, columns right) per px.
ROTATIONS = (0, 5, 10, 15, 20, 25, 30)  # Degrees, each the mean of both directions.
SHEARS = (0.0, 0.1, 0.2, 0.3)  # Columns per row, each the mean of both directions.
SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)
ELASTIC = (0.0, 1.0, 2.0, 3.0)  # Root-mean-square displacement, pixels (sigma 4 px).
TRANSFORMS = {
    **{f"shift {d}": (lambda x, s, d=d: transforms.shift(x, s * DIRECTIONS[d][0],
                                                        s * DIRECTIONS[d][1]))
       for d in DIRECTIONS},
    "rotation +": transforms.rotate,
    "rotation -": lambda x, a: transforms.rotate(x, -a),
    "shear +": transforms.shear,
    "shear -": lambda x, k: transforms.shear(x, -k),
    "scale": transforms.scale,
    "elastic": transforms.elastic,
}  # fmt: skip
SWEEPS = {  # Sweep -> (its levels, the transforms whose mean it reports).
    **{f"shift {d}": (SHIFTS, (f"shift {d}",)) for d in DIRECTIONS},
    "rotation": (ROTATIONS, ("rotation +", "rotation -")),
    "shear": (SHEARS, ("shear +", "shear -")),
    "scale": (SCALES, ("scale",)),
    "elastic": (ELASTIC, ("elastic",)),
}


def is_clean(kind: str, level) -> bool:
    """Whether ``level`` of a sweep or transform ``kind`` leaves the images as they are."""
    return level == (1.0 if kind == "scale" else 0)


_PERTURBED: dict = {}  # (canvas shape, transform, level) -> images, per process.


def perturb(images: np.ndarray, kind: str, level) -> np.ndarray:
    """``TRANSFORMS[kind](images, level)``, made once per process for the test images of
    each canvas size (the variants a process measures share them)."""
    key = (images.shape, kind, level)
    if key not in _PERTURBED:
        _PERTURBED[key] = TRANSFORMS[kind](images, level)
    return _PERTURBED[key]


@functools.cache
def _fashion(train_images: int, test_images: int) -> input_pipeline.Dataset:
    """The data, loaded once per process."""
    return runs.fashion(runs.Plan("", train_images=train_images, test_images=test_images))


def measure_seed(workdir: str, *, name: str, part: tuple[int, int], sweep: bool) -> dict:
    """The seed of variant ``name`` trained in ``workdir``, on the data ``part``
    (``Plan.train_images``, ``Plan.test_images``): its train accuracy, its test images
    right (packed bits, base64), and per sweep (if ``sweep``) its accuracy per level; the
    seconds of it all (``sec``) and of the sweeps (``sweep_sec``)."""
    start = time.perf_counter()
    data = _fashion(*part)
    [classify] = runs.seed_classifiers([workdir])
    images, labels = runs.train_images(name, data)
    test = runs.test_images(name, data)
    right = classify(test) == data.test_labels
    result = {
        "train_accuracy": float(np.mean(classify(images) == labels)),
        "test_right": base64.b64encode(np.packbits(right).tobytes()).decode(),
    }
    if sweep:
        sweep_start = time.perf_counter()

        def accuracy(kind: str, level) -> float:
            perturbed = test if is_clean(kind, level) else perturb(test, kind, level)
            return float(np.mean(classify(perturbed) == data.test_labels))

        result["sweeps"] = {
            sweep: [float(np.mean([accuracy(kind, level) for kind in kinds])) for level in levels]
            for sweep, (levels, kinds) in SWEEPS.items()
        }  # fmt: skip
        result["sweep_sec"] = time.perf_counter() - sweep_start
    return {**result, "sec": time.perf_counter() - start}


def test_right(measures: dict, images: int) -> np.ndarray:
    """Bool ``(images,)``: which test images the measured seed gets right."""
    bits = np.frombuffer(base64.b64decode(measures["test_right"]), dtype=np.uint8)
    return np.unpackbits(bits)[:images].astype(bool)


def swept(names, plan: runs.Plan) -> dict[str, dict]:
    """Per variant, per sweep, per level: the accuracy of each of its first ``plan.seeds``
    seeds; with ``sec``, the seconds their sweeps took."""
    result = {}
    for name in names:
        seeds = [runs.measures(d) for d in runs.seed_dirs(plan, name)[: plan.seeds]]
        result[name] = {
            sweep: [[m["sweeps"][sweep][i] for m in seeds] for i in range(len(levels))]
            for sweep, (levels, _) in SWEEPS.items()
        }
        result[name]["sec"] = sum(m["sweep_sec"] for m in seeds)
    return result
