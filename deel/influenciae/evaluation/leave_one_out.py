"""Leave-one-out checks: do the scores predict how the outputs move when one training sample is removed?"""
import dataclasses

import numpy as np

from .correlation import finite_array, rowwise_pearson, rowwise_spearman


@dataclasses.dataclass(frozen=True)
class LeaveOneOutResult:
    """Agreement of predicted and retrained leave-one-out changes.

    Attributes
    ----------
    pearson, spearman
        Correlations over every (test sample, removed sample) pair pooled together.
    per_test_spearman
        (T,) Spearman correlation across the removed samples of each test sample (NaN where either side is
        constant for that test sample).
    """

    pearson: float
    spearman: float
    per_test_spearman: np.ndarray


def leave_one_out_masks(n: int, removed: object) -> np.ndarray:
    """Masks for :func:`~deel.influenciae.evaluation.retrain_outputs`: row 0 keeps every sample, row 1 + k removes
    ``removed[k]``: (1 + K, N) boolean."""
    removed = np.asarray(removed, dtype=np.int64).reshape(-1)
    if removed.size == 0 or removed.min() < 0 or removed.max() >= int(n):
        raise ValueError(f"removed must hold indices in [0, {int(n)}), got {removed.tolist()[:10]}.")
    masks = np.ones((1 + removed.size, int(n)), dtype=bool)
    masks[np.arange(1, 1 + removed.size), removed] = False
    return masks


def leave_one_out_correlation(scores: object, actual_changes: object) -> LeaveOneOutResult:
    """Compare the change predicted by the scores with the change measured by retraining without each sample.

    Removing a proponent (positive score) should lower the output (larger = better), so the predicted change is
    ``-scores``; correlations are invariant to the positive scale (1/N) that first-order influence omits.

    Parameters
    ----------
    scores
        (T, K) scores of the K removed training samples for T test samples (this library's sign convention).
    actual_changes
        (T, K) output of the model retrained without the sample minus the output of the model trained on every
        sample (from :func:`leave_one_out_masks` outputs: ``outputs[1:] - outputs[:1]``, transposed).

    Returns
    -------
    LeaveOneOutResult

    Raises
    ------
    ValueError
        On mismatched shapes, non-finite values, or fewer than 3 pairs.
    """
    predicted = -finite_array("scores", scores, 2)
    actual = finite_array("actual_changes", actual_changes, 2)
    if predicted.shape != actual.shape:
        raise ValueError(f"scores and actual_changes must both be (T, K), got {predicted.shape} and {actual.shape}.")
    if predicted.size < 3:
        raise ValueError(f"at least 3 (test, removed) pairs are needed, got {predicted.size}.")
    pooled_predicted, pooled_actual = predicted.reshape(1, -1), actual.reshape(1, -1)
    with np.errstate(invalid="ignore"):
        per_test = rowwise_spearman(predicted, actual)
    return LeaveOneOutResult(float(rowwise_pearson(pooled_predicted, pooled_actual)[0]),
                             float(rowwise_spearman(pooled_predicted, pooled_actual)[0]), per_test)
