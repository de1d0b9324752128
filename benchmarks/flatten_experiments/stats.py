"""The statistics of the flatten write-up: intervals over seeds, and tests of two models.

Every accuracy in ``docs/flatten.md`` is a mean over seeds with a 95%
confidence interval (Student's t over the seeds). Two models are compared
on the same test images, which the two-level paired bootstrap of
``difference`` resamples together for both, while it resamples each
model's seeds on its own: the interval it gives covers both sources of
noise, the seeds' and the test set's. The write-up's rule: two models
differ when that 95% interval of the difference excludes 0. McNemar's exact
test (``mcnemar``) compares two single trained models on the same images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% confidence interval, in the data's units."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, scale: float = 100) -> str:
        """``"89.17 [88.60, 89.74]"``, the values times ``scale`` (accuracies in %)."""
        return f"{scale * self.estimate:.2f} [{scale * self.low:.2f}, {scale * self.high:.2f}]"


def mean_interval(values, confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) and Student's t interval around it."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"mean_interval needs 2 or more values, got shape {values.shape}")
    mean = values.mean()
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1)
    half /= np.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def mcnemar(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value: two models, each right or wrong on the same images.

    Only the images where exactly one model is right count; under "equally
    good" each of those goes either way with probability 1/2.
    """
    a, b = _paired(correct_a, correct_b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    tail = stats.binom.cdf(min(only_a, only_b), only_a + only_b, 0.5)
    return float(min(1.0, 2 * tail))


def difference(
    correct_a, correct_b, *, rounds: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Interval:
    """Accuracy of A minus accuracy of B, with a two-level paired bootstrap interval.

    Args:
      correct_a: bool ``(seeds_a, images)``, whether each seed's model of A
        classifies each test image right.
      correct_b: bool ``(seeds_b, images)``, the same images in the same order.
      rounds: bootstrap resamples.
      seed: of the resampling, so that the interval is reproducible.

    Each round draws the test images with replacement (the same draw for both
    models: the pairing) and, independently, each model's seeds with
    replacement; the interval is the percentile interval of the rounds'
    differences of mean accuracy.
    """
    a, b = np.atleast_2d(np.asarray(correct_a, bool)), np.atleast_2d(np.asarray(correct_b, bool))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"different test sets: {a.shape[1]} and {b.shape[1]} images")
    rng = np.random.default_rng(seed)
    images = a.shape[1]
    # Each round's image draw as counts per image: accuracy = correct @ counts / images.
    counts = rng.multinomial(images, np.full(images, 1 / images), size=rounds).astype(np.float32)
    per_seed_a = a.astype(np.float32) @ counts.T / images  # (seeds_a, rounds)
    per_seed_b = b.astype(np.float32) @ counts.T / images
    picks_a = rng.integers(0, len(a), (rounds, len(a)))
    picks_b = rng.integers(0, len(b), (rounds, len(b)))
    columns = np.arange(rounds)[:, None]
    diffs = per_seed_a[picks_a, columns].mean(1) - per_seed_b[picks_b, columns].mean(1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Interval(float(a.mean() - b.mean()), float(low), float(high))


def _paired(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two equal 1-D arrays, got shapes {a.shape} and {b.shape}")
    return a, b
