"""Test accuracy of trained flatten variants under shifts and deformations.

Every shift of 0-8 pixels in x, y and diagonally (the CNN's total stride is 4),
rotation, horizontal shear, scale and elastic deformation, each at a few levels;
zero fill, bilinear resampling, all test images. ``sweep`` measures one seed (right
after it trains: ``measures``); ``swept`` gathers a variant's seeds.
"""

from __future__ import annotations

import numpy as np

from benchmarks.flatten_experiments import deformations, runs
from cnnflat_jax.data import transforms

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
    "rotation +": deformations.rotate,
    "rotation -": lambda x, a: deformations.rotate(x, -a),
    "shear +": deformations.shear,
    "shear -": lambda x, k: deformations.shear(x, -k),
    "scale": deformations.scale,
    "elastic": deformations.elastic,
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


def sweep(classify, images: np.ndarray, labels: np.ndarray, clean: float) -> dict[str, list]:
    """Per sweep, per level: the accuracy of ``classify`` on ``images`` (the test images
    as the variant sees them) perturbed, the mean over the sweep's transforms; ``clean``:
    its accuracy on ``images`` as they are."""

    def accuracy(kind: str, level) -> float:
        if is_clean(kind, level):
            return clean
        return float(np.mean(classify(perturb(images, kind, level)) == labels))

    return {
        sweep: [float(np.mean([accuracy(kind, level) for kind in kinds])) for level in levels]
        for sweep, (levels, kinds) in SWEEPS.items()
    }


def swept(names, plan: runs.Plan) -> dict[str, dict]:
    """Per variant, per sweep, per level: the accuracy of each of its first ``plan.seeds``
    seeds; with ``sec``, the seconds their sweeps took."""
    result = {}
    for name in names:
        seeds = runs.seed_measures(plan, name, plan.seeds)
        result[name] = {
            sweep: [[m["sweeps"][sweep][i] for m in seeds] for i in range(len(levels))]
            for sweep, (levels, _) in SWEEPS.items()
        }
        result[name]["sec"] = sum(m["sweeps_sec"] for m in seeds)
    return result
