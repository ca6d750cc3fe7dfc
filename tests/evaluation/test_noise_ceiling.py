"""Noise ceiling of the LDS against a direct computation and a simulated signal-plus-noise model."""
import itertools

import numpy as np
import pytest
from scipy import stats

from deel.influenciae.evaluation import lds_noise_ceiling


def test_noise_ceiling_matches_scipy_pairs_and_spearman_brown():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(40, 5))
    outputs = signal[None] + rng.normal(scale=0.8, size=(3, 40, 5))
    ceiling = lds_noise_ceiling(outputs)
    direct = np.mean([[stats.spearmanr(outputs[a, :, t], outputs[b, :, t]).statistic for t in range(5)]
                      for a, b in itertools.combinations(range(3), 2)], axis=0)
    np.testing.assert_allclose(ceiling.per_test, direct, atol=1e-12)
    single = direct.mean()
    assert ceiling.seed_pair_correlation == pytest.approx(single, abs=1e-12)
    assert ceiling.reliability == pytest.approx(3 * single / (1 + 2 * single), abs=1e-12)
    assert ceiling.ceiling == pytest.approx(np.sqrt(ceiling.reliability), abs=1e-12)


def test_the_ceiling_bounds_the_correlation_of_the_true_signal():
    """With outputs = signal + noise, the noiseless signal's correlation with the seed mean is about the ceiling."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(400, 30))
    outputs = signal[None] + rng.normal(scale=1.0, size=(4, 400, 30))
    ceiling = lds_noise_ceiling(outputs)
    mean = outputs.mean(axis=0)
    best = np.mean([stats.spearmanr(signal[:, t], mean[:, t]).statistic for t in range(30)])
    assert ceiling.ceiling == pytest.approx(best, abs=0.03)
    # One seed's reliability for noise of the signal's size: Pearson 1/2, Spearman (6/π) asin(1/4) ≈ 0.483.
    assert ceiling.seed_pair_correlation == pytest.approx(6 / np.pi * np.arcsin(0.25), abs=0.02)


def test_noise_ceiling_errors():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        lds_noise_ceiling(np.ones((1, 5, 2)))
    with pytest.raises(ValueError, match="3 dimensions"):
        lds_noise_ceiling(np.ones((5, 2)))
    outputs = np.random.default_rng(2).normal(size=(2, 6, 3))
    outputs[1, :, 2] = 4.0
    with pytest.raises(ValueError, match="seed 1 .* test sample 2"):
        lds_noise_ceiling(outputs)
    outputs[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        lds_noise_ceiling(outputs)
