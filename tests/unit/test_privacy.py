"""The Gaussian mechanism on profile embeddings: clipping and the noise scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from inference.exceptions import InferenceError
from inference.privacy import GaussianMechanism, clip_l2


def test_sigma_follows_the_gaussian_mechanism_formula() -> None:
    mech = GaussianMechanism(epsilon=0.5, delta=1e-6, clip_norm=2.0)
    assert mech.sigma == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e6)) / 0.5)
    assert GaussianMechanism(clip_norm=1.0, sensitivity=2.0).sigma == pytest.approx(
        2 * GaussianMechanism(clip_norm=1.0).sigma
    )


def test_clip_only_shrinks_long_vectors() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    clipped = clip_l2(rows, 1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8])
    np.testing.assert_allclose(clipped[1], [0.3, 0.4])


def test_noise_has_the_stated_scale_and_mean() -> None:
    mech = GaussianMechanism(epsilon=1.0, delta=1e-5, clip_norm=0.5)
    rng = np.random.default_rng(7)
    profile = np.full(384, 10.0, dtype=np.float32)  # norm far above C: must be clipped first
    releases = mech.privatize(np.tile(profile, (200, 1)), rng, renormalize=False)
    noise = releases.astype(np.float64) - clip_l2(profile, 0.5)
    n = noise.size
    # The sample variance of n normal draws: (n-1) s^2 / sigma^2 ~ chi2(n-1).
    statistic = (n - 1) * noise.var(ddof=1) / mech.sigma**2
    assert stats.chi2.sf(statistic, n - 1) > 1e-4
    assert stats.chi2.cdf(statistic, n - 1) > 1e-4
    assert abs(noise.mean()) < 5 * mech.sigma / math.sqrt(n)
    # And the noise is large: this is what protects the user.
    assert noise.std() > 5 * 0.5 / math.sqrt(384)


def test_released_vectors_are_unit_length_and_differ_per_release() -> None:
    mech = GaussianMechanism()
    rng = np.random.default_rng(1)
    profile = np.ones(16) / 4.0
    first, second = mech.privatize(profile, rng), mech.privatize(profile, rng)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(first, second)


@pytest.mark.parametrize(
    "kwargs", [{"epsilon": 0.0}, {"epsilon": 2.0}, {"delta": 1.0}, {"clip_norm": -1.0}]
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InferenceError):
        GaussianMechanism(**kwargs)
