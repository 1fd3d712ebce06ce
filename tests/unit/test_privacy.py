"""The Gaussian mechanism on profile embeddings: calibration, sensitivity, noise source, zCDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from inference.exceptions import InferenceError
from inference.privacy import (
    GaussianMechanism,
    analytic_gaussian_sigma,
    clip_l2,
    epsilon_to_rho,
    rho_to_epsilon,
    secure_normal,
)


def _exact_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Balle & Wang's condition solved independently (scipy's normal CDF and root finder)."""

    def excess(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(stats.norm.cdf(a - b) - math.exp(epsilon) * stats.norm.cdf(-a - b) - delta)

    return float(optimize.brentq(excess, 1e-3 * sensitivity, 1e3 * sensitivity, xtol=1e-12))


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_sigma_is_the_analytic_gaussian_calibration(epsilon: float, delta: float) -> None:
    sigma = analytic_gaussian_sigma(epsilon, delta, 2.0)
    assert sigma == pytest.approx(_exact_sigma(epsilon, delta, 2.0), rel=1e-7)


def test_analytic_sigma_beats_the_classic_bound_where_that_one_holds() -> None:
    for epsilon in (0.1, 0.5, 0.99):
        classic = 2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / epsilon
        assert analytic_gaussian_sigma(epsilon, 1e-5, 2.0) < classic


def test_sensitivity_is_twice_the_clip_norm() -> None:
    # Two clipped profiles of one user can point in opposite directions: distance 2C.
    mech = GaussianMechanism(epsilon=1.0, delta=1e-5, clip_norm=0.5)
    assert mech.sensitivity == 1.0
    a, b = clip_l2(np.array([3.0, 0.0]), 0.5), clip_l2(np.array([-7.0, 0.0]), 0.5)
    assert np.linalg.norm(a - b) == pytest.approx(mech.sensitivity)
    assert mech.sigma == pytest.approx(_exact_sigma(1.0, 1e-5, 1.0), rel=1e-7)
    # The documented figure: ε = 1, δ = 1e-5, C = 1.
    assert GaussianMechanism().sigma == pytest.approx(7.46, abs=0.01)
    assert GaussianMechanism().rho == pytest.approx(4.0 / (2 * GaussianMechanism().sigma ** 2))


def test_clip_only_shrinks_long_vectors() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    clipped = clip_l2(rows, 1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8])
    np.testing.assert_allclose(clipped[1], [0.3, 0.4])


def _variance_consistent(noise: np.ndarray, sigma: float) -> None:
    """(n-1) s² / σ² ~ chi2(n-1): both tails beyond 1e-6 would fail a correct sampler rarely."""
    n = noise.size
    statistic = (n - 1) * noise.var(ddof=1) / sigma**2
    assert stats.chi2.sf(statistic, n - 1) > 1e-6, "noise wider than sigma"
    assert stats.chi2.cdf(statistic, n - 1) > 1e-6, "noise narrower than sigma"
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)


def test_production_noise_has_the_analytic_scale() -> None:
    # The CSPRNG path, unseeded: what the service publishes.
    mech = GaussianMechanism(epsilon=1.0, delta=1e-5, clip_norm=0.5)
    profile = np.full(384, 10.0)  # norm far above C: must be clipped first
    releases = mech.privatize(np.tile(profile, (300, 1)))
    noise = releases.astype(np.float64) - clip_l2(profile, 0.5)
    _variance_consistent(noise, mech.sigma)
    # The clipped signal is what the noise is centred on: its norm is C, not 196.
    assert np.linalg.norm(releases.mean(axis=0)) < 0.5 + 6 * mech.sigma * math.sqrt(384 / 300)


def test_secure_normal_is_standard_normal_and_not_repeating() -> None:
    draws = secure_normal((200_001,))  # odd: the last Box-Muller pair is cut
    assert draws.shape == (200_001,)
    _variance_consistent(draws, 1.0)
    assert stats.kstest(draws, "norm").pvalue > 1e-6
    assert not np.array_equal(secure_normal((8,)), secure_normal((8,)))


def test_test_rng_is_only_used_when_named() -> None:
    mech = GaussianMechanism()
    profile = np.ones(16) / 4.0
    first = mech.privatize(profile, insecure_rng_for_tests=np.random.default_rng(3))
    again = mech.privatize(profile, insecure_rng_for_tests=np.random.default_rng(3))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(mech.privatize(profile), mech.privatize(profile))


def test_renormalised_releases_are_unit_length() -> None:
    release = GaussianMechanism().privatize(np.ones(16) / 4.0, renormalize=True)
    assert np.linalg.norm(release) == pytest.approx(1.0, abs=1e-5)


def test_zcdp_conversion_round_trips_and_composes_tighter_than_adding_epsilons() -> None:
    rho = epsilon_to_rho(10.0, 1e-5)
    assert rho_to_epsilon(rho, 1e-5) == pytest.approx(10.0)
    mech = GaussianMechanism()
    releases = int(rho // mech.rho)
    # k releases at ε = 1 each: basic composition says ε = k; zCDP says 10 for k this large.
    assert releases > 10
    assert rho_to_epsilon(releases * mech.rho, 1e-5) <= 10.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": float("nan")},
        {"epsilon": 51.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"clip_norm": -1.0},
        {"clip_norm": 0.0},
        {"clip_norm": float("inf")},
    ],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InferenceError):
        GaussianMechanism(**kwargs)


def test_large_epsilon_is_calibrated_not_refused() -> None:
    # The analytic calibration holds for ε > 1, where the classic bound does not.
    assert GaussianMechanism(epsilon=4.0).sigma == pytest.approx(_exact_sigma(4.0, 1e-5, 2.0))
