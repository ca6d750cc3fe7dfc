"""Linear datamodeling score, subset masks and leave-one-out correlation against direct SciPy computations."""
import numpy as np
import pytest
from scipy import stats

from deel.influenciae.evaluation import (leave_one_out_correlation, leave_one_out_masks, linear_datamodeling_score,
                                         random_subset_masks)


def direct_lds(scores, masks, outputs):
    """One scipy.stats.spearmanr per test sample, on the summed scores of the kept samples."""
    per_test = []
    for test in range(scores.shape[0]):
        predicted = [scores[test, mask].sum() for mask in masks]
        per_test.append(stats.spearmanr(predicted, outputs[:, test]).statistic)
    return np.array(per_test)


def test_lds_matches_scipy_per_test_sample():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 40))
    masks = random_subset_masks(40, 30, seed=1)
    outputs = masks.astype(float) @ scores.T + rng.normal(scale=2.0, size=(30, 7))
    result = linear_datamodeling_score(scores, masks, outputs)
    expected = direct_lds(scores, masks, outputs)
    np.testing.assert_allclose(result.per_test, expected, atol=1e-12)
    assert result.score == pytest.approx(expected.mean(), abs=1e-12)
    assert result.score > 0.3  # the outputs were built from the scores plus noise


def test_lds_with_ties_matches_scipy():
    rng = np.random.default_rng(2)
    scores = rng.integers(-2, 3, size=(5, 12)).astype(float)  # integer scores: many tied predictions
    masks = random_subset_masks(12, 25, fraction=0.25, seed=3)
    outputs = np.round(rng.normal(size=(25, 5)))  # rounded outputs: many ties
    outputs[0] += 10.0  # no constant column
    scores[:, 0] = 5.0  # no constant prediction row
    result = linear_datamodeling_score(scores, masks, outputs)
    np.testing.assert_allclose(result.per_test, direct_lds(scores, masks, outputs), atol=1e-12)


def test_lds_sign_convention_and_bootstrap():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(20, 30))
    masks = random_subset_masks(30, 50, seed=5)
    outputs = masks.astype(float) @ scores.T  # exactly linear in the scores: LDS 1
    assert linear_datamodeling_score(scores, masks, outputs).score == pytest.approx(1.0, abs=1e-12)
    assert linear_datamodeling_score(-scores, masks, outputs).score == pytest.approx(-1.0, abs=1e-12)
    noisy = outputs + rng.normal(scale=3.0, size=outputs.shape)
    result = linear_datamodeling_score(scores, masks, noisy, bootstrap=2000, seed=0)
    low, high = result.confidence_interval
    assert low < result.score < high
    draws = np.random.default_rng(0).integers(0, 20, size=(2000, 20))
    means = result.per_test[draws].mean(axis=1)
    assert (low, high) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))


@pytest.mark.parametrize("change, message", [
    (lambda s, m, o: (s[:, :-1], m, o), "disagree on N"),
    (lambda s, m, o: (s, m, o[:, :-1]), "outputs must be"),
    (lambda s, m, o: (s[0], m, o), "scores must have 2"),
    (lambda s, m, o: (np.where(np.arange(s.size).reshape(s.shape) == 3, np.nan, s), m, o), "non-finite"),
    (lambda s, m, o: (s, m, np.where(np.arange(o.size).reshape(o.shape) == 2, np.inf, o)), "non-finite"),
    (lambda s, m, o: (s, m * 2, o), "boolean"),
    (lambda s, m, o: (s, m[:2], o[:2]), "at least 3"),
    (lambda s, m, o: (s, m, np.concatenate([np.ones_like(o[:, :1]), o[:, 1:]], axis=1)), "test sample 0"),
    (lambda s, m, o: (np.zeros_like(s), m, o), "every test sample"),
])
def test_lds_errors(change, message):
    rng = np.random.default_rng(6)
    scores, masks = rng.normal(size=(3, 10)), random_subset_masks(10, 8, seed=7)
    outputs = rng.normal(size=(8, 3))
    with pytest.raises(ValueError, match=message):
        linear_datamodeling_score(*change(scores, masks, outputs))


def test_random_subset_masks():
    masks = random_subset_masks(11, 200, fraction=0.3, seed=8)
    assert masks.shape == (200, 11) and masks.dtype == bool
    assert np.all(masks.sum(axis=1) == 3)
    np.testing.assert_array_equal(masks, random_subset_masks(11, 200, fraction=0.3, seed=8))
    assert not np.array_equal(masks, random_subset_masks(11, 200, fraction=0.3, seed=9))
    assert np.all(np.abs(masks.mean(axis=0) - 3 / 11) < 0.12)  # every sample about equally often kept
    with pytest.raises(ValueError, match="fraction"):
        random_subset_masks(10, 5, fraction=1.0)


def test_leave_one_out_masks_and_correlation():
    masks = leave_one_out_masks(5, [3, 0])
    np.testing.assert_array_equal(masks, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [0, 1, 1, 1, 1]])
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(4, 6))
    actual = -0.01 * scores + rng.normal(scale=0.002, size=(4, 6))
    result = leave_one_out_correlation(scores, actual)
    assert result.pearson == pytest.approx(stats.pearsonr(-scores.ravel(), actual.ravel()).statistic, abs=1e-12)
    assert result.spearman == pytest.approx(stats.spearmanr(-scores.ravel(), actual.ravel()).statistic, abs=1e-12)
    expected = [stats.spearmanr(-scores[t], actual[t]).statistic for t in range(4)]
    np.testing.assert_allclose(result.per_test_spearman, expected, atol=1e-12)
    with pytest.raises(ValueError, match="removed"):
        leave_one_out_masks(5, [5])
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        leave_one_out_correlation(scores, actual[:, :-1])


def test_average_ranks_match_scipy_rankdata():
    from deel.influenciae.evaluation.correlation import average_ranks  # pylint: disable=import-outside-toplevel
    values = np.random.default_rng(10).integers(0, 6, size=(9, 30)).astype(float)  # ties in every row
    np.testing.assert_array_equal(average_ranks(values), stats.rankdata(values, axis=1))


def test_more_bad_inputs_are_named():
    rng = np.random.default_rng(11)
    scores, masks = rng.normal(size=(3, 10)), random_subset_masks(10, 8, seed=12)
    with pytest.raises(ValueError, match="confidence"):
        linear_datamodeling_score(scores, masks, rng.normal(size=(8, 3)), bootstrap=10, confidence=1.5)
    with pytest.raises(ValueError, match="actual_changes holds a non-finite value at index \\(1, 2\\)"):
        changes = np.zeros((3, 4))
        changes[1, 2] = np.nan
        leave_one_out_correlation(rng.normal(size=(3, 4)), changes)


def test_a_test_sample_with_constant_predictions_is_left_out(caplog):
    rng = np.random.default_rng(8)
    scores, masks = rng.normal(size=(4, 12)), random_subset_masks(12, 20, seed=9)
    outputs = masks.astype(float) @ scores.T + rng.normal(size=(20, 4))
    scores[1] = 0.0  # e.g. a test sample the model fits perfectly: zero gradient, zero scores
    with caplog.at_level("WARNING"):
        result = linear_datamodeling_score(scores, masks, outputs, bootstrap=200)
    assert "1 test sample(s) (first: 1)" in caplog.text and result.undefined == 1
    assert np.isnan(result.per_test[1])
    kept = [0, 2, 3]
    np.testing.assert_allclose(result.per_test[kept], direct_lds(scores[kept], masks, outputs[:, kept]), atol=1e-12)
    assert result.score == pytest.approx(result.per_test[kept].mean(), abs=1e-12)
    low, high = result.confidence_interval
    assert np.isfinite(low) and np.isfinite(high)
