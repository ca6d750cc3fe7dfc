"""Damping selection by LDS and leave-one-out, against a method whose quality at each damping is known."""
import numpy as np
import pytest

from deel.influenciae.evaluation import (damping_grid, leave_one_out_correlation, linear_datamodeling_score,
                                         random_subset_masks, select_damping)


@pytest.fixture(name="problem", scope="module")
def _problem():
    """Outputs generated from 'true' scores; the method adds noise whose size grows with |log10(λ) + 3|, so the
    best damping is 1e-3 by construction."""
    rng = np.random.default_rng(0)
    true_scores = rng.normal(size=(6, 60))
    masks = random_subset_masks(60, 80, seed=1)
    outputs = masks.astype(float) @ true_scores.T + rng.normal(scale=0.5, size=(80, 6))
    noise = np.random.default_rng(2).normal(size=true_scores.shape)

    def scores_for(damping):
        return true_scores + 2.0 * abs(np.log10(damping) + 3.0) * noise

    return {"true": true_scores, "masks": masks, "outputs": outputs, "scores_for": scores_for}


def test_select_damping_by_lds_finds_the_constructed_optimum(problem):
    grid = damping_grid(1e-5, 1e-1)
    np.testing.assert_allclose(grid, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    selection = select_damping(problem["scores_for"], grid, masks=problem["masks"], outputs=problem["outputs"])
    assert selection.best == pytest.approx(1e-3) and selection.criterion == "lds"
    expected = [linear_datamodeling_score(problem["scores_for"](d), problem["masks"], problem["outputs"]).score
                for d in grid]
    np.testing.assert_allclose(selection.values, expected, atol=1e-12)
    assert selection.best_value == pytest.approx(max(expected))
    assert selection.values[2] > selection.values[0] and selection.values[2] > selection.values[4]


def test_select_damping_by_leave_one_out(problem):
    removed_scores = problem["true"][:, :20]
    changes = -removed_scores + np.random.default_rng(3).normal(scale=0.3, size=removed_scores.shape)
    noise = np.random.default_rng(4).normal(size=removed_scores.shape)

    def scores_for(damping):
        return removed_scores + 3.0 * abs(np.log10(damping) + 2.0) * noise

    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    selection = select_damping(scores_for, grid, actual_changes=changes)
    assert selection.best == pytest.approx(1e-2) and selection.criterion == "leave_one_out"
    np.testing.assert_allclose(selection.values,
                               [leave_one_out_correlation(scores_for(d), changes).spearman for d in grid], atol=1e-12)


def test_failures_are_recorded_and_ties_take_the_largest_damping(problem):
    def scores_for(damping):
        if damping < 1e-3:
            raise ValueError("LiSSA diverged")
        return problem["true"]  # the same scores at every damping: a tie

    selection = select_damping(scores_for, [1e-4, 1e-3, 1e-2], masks=problem["masks"], outputs=problem["outputs"])
    assert np.isnan(selection.values[0]) and "diverged" in selection.failures[1e-4]
    assert selection.values[1] == selection.values[2] and selection.best == 1e-2


def test_select_damping_errors(problem):
    masks, outputs = problem["masks"], problem["outputs"]
    with pytest.raises(ValueError, match="either masks and outputs"):
        select_damping(problem["scores_for"], [1e-3])
    with pytest.raises(ValueError, match="either masks and outputs"):
        select_damping(problem["scores_for"], [1e-3], masks=masks, outputs=outputs, actual_changes=np.ones((6, 3)))
    with pytest.raises(ValueError, match="both masks"):
        select_damping(problem["scores_for"], [1e-3], masks=masks)
    with pytest.raises(ValueError, match="at least one"):
        select_damping(problem["scores_for"], [], masks=masks, outputs=outputs)
    with pytest.raises(ValueError, match=">= 0"):
        select_damping(problem["scores_for"], [-1.0], masks=masks, outputs=outputs)
    with pytest.raises(ValueError, match="distinct"):
        select_damping(problem["scores_for"], [1e-3, 1e-3], masks=masks, outputs=outputs)
    with pytest.raises(ValueError, match="every damping"):
        select_damping(lambda d: (_ for _ in ()).throw(ValueError("no")), [1e-3], masks=masks, outputs=outputs)
    with pytest.raises(ValueError):  # wrong shape of scores: the LDS check names it (a bug, not a failure)
        select_damping(lambda d: np.ones((2, 3)), [1e-3], masks=masks, outputs=outputs)
    with pytest.raises(ValueError, match="low <= high"):
        damping_grid(1e-1, 1e-3)
    with pytest.raises(ValueError, match="per_decade"):
        damping_grid(1e-3, 1e-1, per_decade=0)
    np.testing.assert_allclose(damping_grid(1e-4, 1e-2, per_decade=2), np.geomspace(1e-4, 1e-2, 5))


def test_scores_without_any_ranking_are_a_failure_not_a_crash(problem):
    def scores_for(damping):
        return np.zeros_like(problem["true"]) if damping > 1e-2 else problem["true"]

    selection = select_damping(scores_for, [1e-3, 1e-1], masks=problem["masks"], outputs=problem["outputs"])
    assert np.isnan(selection.values[1]) and "constant" in selection.failures[0.1] and selection.best == 1e-3
