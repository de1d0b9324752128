"""Test accuracy of trained flatten variants under shifts and deformations.

Every shift of 0-8 pixels in x, y and diagonally (the CNN's total stride is 4),
rotation, horizontal shear, scale and elastic deformation, each at a few levels;
zero fill, bilinear resampling. Each variant's first ``Plan.seeds`` models are
measured on all test images; ``sweep_all`` runs the variants in parallel, one CPU
core each, and keeps each variant's result in its ``sweeps.json``.
"""

from __future__ import annotations

import json
import os
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


def measure(seed_dirs: list[str], images: np.ndarray, labels: np.ndarray) -> dict:
    """Per sweep, per level, per seed: the accuracy of each run in ``seed_dirs`` on
    ``images`` perturbed (the test images as the variant sees them); with ``sec``."""
    start = time.perf_counter()
    classifiers = runs.seed_classifiers(seed_dirs)

    def accuracy(kind: str, level) -> list[float]:  # Per seed.
        perturbed = images if is_clean(kind, level) else perturb(images, kind, level)
        return [float(np.mean(classify(perturbed) == labels)) for classify in classifiers]

    result = {
        sweep: [np.mean([accuracy(kind, level) for kind in kinds], axis=0).tolist()
                for level in levels]
        for sweep, (levels, kinds) in SWEEPS.items()
    }  # fmt: skip
    return {**result, "sec": time.perf_counter() - start}


def sweep_all(names, data: input_pipeline.Dataset, plan: runs.Plan) -> dict[str, dict]:
    """``measure`` for each variant in ``names`` (reusing a ``sweeps.json`` newer than the
    variant's ``summary.json``), the variants in parallel."""
    results, todo = {}, {}
    for name in names:
        workdir = runs.run_dir(plan, name)
        path = os.path.join(workdir, "sweeps.json")
        summary = os.path.join(workdir, "summary.json")
        if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(summary):
            with open(path) as f:
                results[name] = json.load(f)
        else:
            dirs = runs.seed_dirs(plan, name)[: plan.seeds]
            todo[name] = (dirs, runs.test_images(name, data), data.test_labels)
    for name, result in runs.parallel(measure, todo, plan.workers) if todo else ():
        with open(os.path.join(runs.run_dir(plan, name), "sweeps.json"), "w") as f:
            json.dump(result, f)
        results[name] = result
    return {name: results[name] for name in names}
