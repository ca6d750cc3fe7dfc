"""Mislabeled-sample detection metrics: how early a self-influence ranking finds the flipped labels.

One implementation for the benchmark (:mod:`deel.influenciae.benchmark`), the demo and ``benchmarks/`` scripts.
Samples are ranked by descending score; ties keep the dataset order.
"""
import numpy as np


def mislabeled_mask(mislabeled: object, n: int) -> np.ndarray:
    """The mislabeled samples as an (N,) boolean mask, from a boolean mask (N,) or from indices."""
    values = np.asarray(mislabeled)
    if values.dtype == bool:
        if values.shape != (n,):
            raise ValueError(f"a boolean mislabeled mask must be ({n},), got {values.shape}.")
        return values
    indices = values.astype(np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"mislabeled indices must lie in [0, {n}).")
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def detection_curve(scores: object, mislabeled: object) -> np.ndarray:
    """Fraction of the mislabeled samples among the r highest scores, r = 1..N.

    Parameters
    ----------
    scores
        (N,) or (N, 1) self-influence (or any suspicion score) of the training samples.
    mislabeled
        (N,) boolean mask or indices of the mislabeled samples.

    Returns
    -------
    np.ndarray
        (N,) non-decreasing curve ending at 1 (the raw counts when there is no mislabeled sample).
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    flags = mislabeled_mask(mislabeled, values.shape[0]).astype(np.float64)
    found = np.cumsum(flags[np.argsort(-values, kind="stable")])
    total = flags.sum()
    return found / total if total > 0 else found


def detection_area(curve: object) -> float:
    """Area under a detection curve: its mean (about 0.5 for a random ranking, 1 for a perfect one)."""
    return float(np.mean(np.asarray(curve, dtype=np.float64)))


def share_found(scores: object, mislabeled: object, share: float) -> float:
    """Share of the mislabeled samples among the ``round(share * N)`` highest scores."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    flags = mislabeled_mask(mislabeled, values.shape[0])
    top = np.argsort(-values, kind="stable")[:int(round(share * values.shape[0]))]
    return float(flags[top].sum() / max(int(flags.sum()), 1))


def detection_roc_auc(scores: object, mislabeled: object) -> float:
    """Probability that a mislabeled sample scores higher than a clean one (Mann-Whitney; ties count half)."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    flags = mislabeled_mask(mislabeled, values.shape[0])
    if flags.all() or not flags.any():
        raise ValueError("detection_roc_auc needs both mislabeled and clean samples.")
    flipped_scores, clean_scores = values[flags], np.sort(values[~flags])
    below = np.searchsorted(clean_scores, flipped_scores, side="left")
    below_or_equal = np.searchsorted(clean_scores, flipped_scores, side="right")
    return float((below + below_or_equal).sum() / (2.0 * len(flipped_scores) * len(clean_scores)))
