"""The flatten write-up's statistics and measures against hand-computed and analytic values."""

import numpy as np
import pytest
from scipy import stats

from benchmarks.flatten_experiments import equivariance as flatten_equivariance
from benchmarks.flatten_experiments import measures as flatten_measures
from benchmarks.flatten_experiments import stats as flatten_stats


def test_mean_interval_is_students_t_worked_by_hand():
    interval = flatten_stats.mean_interval([1, 2, 3, 4, 5])
    # s = sqrt(2.5) = 1.58114, s / sqrt(5) = 0.70711, t(0.975, 4) = 2.77645.
    assert interval.estimate == 3
    np.testing.assert_allclose([interval.low, interval.high], [3 - 1.96324, 3 + 1.96324], 1e-5)
    assert interval.text(scale=1) == "3.00 [1.04, 4.96]"
    with pytest.raises(ValueError, match="2 or more values"):
        flatten_stats.mean_interval([0.9])


@pytest.mark.parametrize(
    "only_a,only_b,expected",
    [(0, 6, 2 / 64), (1, 9, 2 * 11 / 1024), (5, 5, 1.0), (0, 0, 1.0), (30, 10, None)],
)
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images(only_a, only_b, expected):
    both = 50  # Images both get right (and 20 that both get wrong): they do not count.
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * 20)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * 20)
    p = flatten_stats.mcnemar(a, b)
    if expected is None:
        expected = stats.binomtest(only_b, only_a + only_b, 0.5).pvalue
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_the_paired_bootstrap_matches_the_analytic_standard_error_of_one_pair():
    rng = np.random.default_rng(1)
    images = 10_000
    a = rng.random(images) < 0.90
    b = np.where(rng.random(images) < 0.05, ~a, a)  # Disagrees with A on ~5% of images.
    interval = flatten_stats.difference(a[None], b[None], rounds=4000)
    only_a, only_b = np.mean(a & ~b), np.mean(~a & b)
    se = np.sqrt((only_a + only_b - (only_a - only_b) ** 2) / images)
    assert interval.estimate == pytest.approx(a.mean() - b.mean())
    assert (interval.high - interval.low) / 2 == pytest.approx(1.96 * se, rel=0.1)
    # Unpaired, the error would be that of two independent accuracies: ~2x wider here.
    unpaired = np.sqrt((a.mean() * (1 - a.mean()) + b.mean() * (1 - b.mean())) / images)
    assert 1.96 * unpaired > 2 * (interval.high - interval.low) / 2


def test_seed_noise_widens_the_interval_and_the_same_model_never_differs():
    rng = np.random.default_rng(2)
    images = 5_000
    base = rng.random(images) < 0.88
    steady = np.stack([base] * 5)
    # Five seeds at 88-93% (std ~1.9 points): each puts right a share of base's errors.
    spread = np.stack([np.where(rng.random(images) < f, True, base) for f in np.arange(5) / 10])
    perfect = np.ones((5, images), bool)
    same = flatten_stats.difference(steady, steady)
    assert (same.estimate, same.low, same.high) == (0, 0, 0) and not same.excludes_zero()
    narrow = flatten_stats.difference(steady, perfect)  # The test images' noise only.
    wide = flatten_stats.difference(spread, perfect)  # The seeds' too.
    assert (wide.high - wide.low) > 1.5 * (narrow.high - narrow.low)
    assert narrow.excludes_zero() and wide.excludes_zero()  # A perfect B is clearly better.
    assert flatten_stats.difference(spread, perfect) == wide  # The resampling is seeded.


def test_different_test_sets_are_refused():
    with pytest.raises(ValueError, match="different test sets: 3 and 4 images"):
        flatten_stats.difference(np.ones((2, 3), bool), np.ones((2, 4), bool))


def test_still_active_counts_the_first_vectors_active_positions_only():
    base = np.array([[1.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    other = np.array([[0.5, 0.0, 7.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # Row 0: 2 of base's 3 active positions stay active (other's extra one does not count).
    np.testing.assert_allclose(flatten_equivariance.still_active(base, other), [2 / 3, 0.0])
    np.testing.assert_allclose(flatten_equivariance.still_active(other, base), [2 / 3, 0.0])


@pytest.mark.parametrize("same_class", [True, False])
def test_baseline_partners_are_other_images_of_the_same_or_another_class(same_class):
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    chosen = flatten_equivariance.partners(labels, same_class)
    assert np.all(chosen != np.arange(len(labels)))
    assert np.all((labels[chosen] == labels) == same_class)
    np.testing.assert_array_equal(chosen, flatten_equivariance.partners(labels, same_class))


def test_which_test_images_a_seed_gets_right_is_kept_as_8_a_byte_in_base64():
    right = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1], bool)  # Bytes 0xA0 0x80: "oIA=".
    assert flatten_measures.pack_right(right) == "oIA="
    np.testing.assert_array_equal(flatten_measures.test_right({"test_right": "oIA="}, 9), right)
