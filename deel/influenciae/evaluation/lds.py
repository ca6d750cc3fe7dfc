"""The linear datamodeling score (LDS; Park et al., "TRAK: Attributing Model Behavior at Scale", 2023).

Models are retrained on M random subsets of the training set. For a test sample t, an attribution method predicts
the retrained models' output on t by the sum of the scores of the training samples each subset keeps,
``masks @ scores[t]``; the LDS of t is the Spearman correlation, across the M subsets, between that prediction and
the output actually measured. The score of a method is the mean over test samples.
"""
import dataclasses
import logging
from typing import Optional, Tuple

import numpy as np

from .correlation import finite_array, rowwise_spearman

LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one attribution method.

    Attributes
    ----------
    score
        Mean over the test samples of their Spearman correlations.
    per_test
        (T,) Spearman correlation of each test sample.
    confidence_interval
        ``(low, high)`` percentile bootstrap interval of ``score`` over test samples, or None when not asked.
    undefined
        Number of test samples whose predictions do not vary across the subsets (e.g. a method that gives them
        all-zero scores): their ``per_test`` entry is NaN and they are left out of ``score`` and the interval.
    """

    score: float
    per_test: np.ndarray
    confidence_interval: Optional[Tuple[float, float]] = None
    undefined: int = 0


def check_lds_inputs(scores: object, masks: object, outputs: object) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert the inputs of :func:`linear_datamodeling_score` (see there for shapes).

    Raises
    ------
    ValueError
        On a wrong number of dimensions, mismatched sizes, a non-finite value, a mask that is not boolean or 0/1,
        or fewer than 3 subsets.
    """
    scores = finite_array("scores", scores, 2)
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"masks must be (M, N), got shape {masks.shape}.")
    if masks.dtype != bool:
        if not np.all(np.isin(masks, (0, 1))):
            raise ValueError("masks must be boolean (or hold only 0 and 1): True where a subset keeps a sample.")
        masks = masks.astype(bool)
    outputs = finite_array("outputs", outputs, 2)
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores (T, N) and masks (M, N) disagree on N: {scores.shape} vs {masks.shape}.")
    if outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"outputs must be (M, T) = ({masks.shape[0]}, {scores.shape[0]}) for masks {masks.shape} "
                         f"and scores {scores.shape}, got {outputs.shape}.")
    if masks.shape[0] < 3:
        raise ValueError(f"at least 3 subsets are needed for a rank correlation, got {masks.shape[0]}.")
    return scores, masks, outputs


def linear_datamodeling_score(scores: object, masks: object, outputs: object, bootstrap: int = 0,
                              confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """Linear datamodeling score of attribution scores against retrained models.

    Parameters
    ----------
    scores
        (T, N) scores of the N training samples for T test samples, in this library's sign convention: positive for
        a proponent (a training sample whose presence lowers the test loss).
    masks
        (M, N) boolean: row m is True where subset m keeps the training sample (:func:`random_subset_masks`).
    outputs
        (M, T) output of the model retrained on subset m, measured on test sample t, oriented so that larger means
        better (minus the test loss, or the margin), averaged over retraining seeds when there are several.
    bootstrap
        Number of bootstrap resamplings of the test samples for a confidence interval (0: none).
    confidence
        Coverage of the interval, in (0, 1).
    seed
        Seed of the bootstrap.

    Returns
    -------
    LDSResult
        The mean score, the (T,) per-test correlations and, with ``bootstrap``, the interval.

    Raises
    ------
    ValueError
        On mismatched shapes or non-finite values (see :func:`check_lds_inputs`), when a test sample's outputs are
        the same for every subset (naming it), or when the predictions of every test sample are. A test sample whose
        predictions alone are constant is left out with a warning (see ``LDSResult.undefined``).
    """
    scores, masks, outputs = check_lds_inputs(scores, masks, outputs)
    if bootstrap and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    predicted = scores @ masks.T.astype(np.float64)  # (T, M)
    constant_outputs = np.flatnonzero(np.all(outputs.T == outputs.T[:, :1], axis=1))
    if constant_outputs.size:
        raise ValueError(f"outputs are constant across the subsets for test sample {int(constant_outputs[0])}: its "
                         "rank correlation is undefined (check the measurement).")
    undefined = np.all(predicted == predicted[:, :1], axis=1)
    if undefined.all():
        raise ValueError("predictions (masks @ scores.T) are constant across the subsets for every test sample "
                         "(first: test sample 0): the scores carry no ranking.")
    if undefined.any():
        LOGGER.warning("LDS: the predictions of %d test sample(s) (first: %d) are constant across the subsets "
                       "(e.g. all-zero scores): their correlation is undefined and left out of the mean.",
                       int(undefined.sum()), int(np.flatnonzero(undefined)[0]))
    per_test = np.full(predicted.shape[0], np.nan)
    per_test[~undefined] = rowwise_spearman(predicted[~undefined], outputs.T[~undefined])
    interval = None
    if bootstrap:
        defined = per_test[~undefined]
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, defined.shape[0], size=(int(bootstrap), defined.shape[0]))
        means = defined[draws].mean(axis=1)
        tail = (1.0 - confidence) / 2.0
        interval = (float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))
    return LDSResult(float(np.nanmean(per_test)), per_test, interval, int(undefined.sum()))


def random_subset_masks(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """M random subsets of N training samples, each keeping ``round(fraction * N)`` samples drawn without
    replacement.

    Parameters
    ----------
    n
        Number of training samples N.
    m
        Number of subsets M.
    fraction
        Share of the samples each subset keeps, in (0, 1).
    seed
        Seed of the draw.

    Returns
    -------
    np.ndarray
        (M, N) boolean masks.
    """
    n, m = int(n), int(m)
    if n < 2 or m < 1:
        raise ValueError(f"n must be >= 2 and m >= 1, got n={n}, m={m}.")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    kept = min(max(int(round(fraction * n)), 1), n - 1)
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((m, n)), axis=1)[:, :kept]
    masks = np.zeros((m, n), dtype=bool)
    np.put_along_axis(masks, order, True, axis=1)
    return masks
