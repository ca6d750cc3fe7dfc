"""Rank and correlation helpers of the evaluation module (NumPy only)."""
import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of every row's entries (1 = smallest), ties given the mean of the ranks they span.

    Parameters
    ----------
    values
        (R, M) array; each row is ranked on its own.

    Returns
    -------
    np.ndarray
        (R, M) float64 ranks in [1, M].
    """
    values = np.asarray(values, dtype=np.float64)
    rows, length = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    ranks = np.empty((rows, length), dtype=np.float64)
    positions = np.arange(1, length + 1, dtype=np.float64)
    for row in range(rows):  # one pass per row over its tie groups; rows are test samples, not data samples
        starts = np.flatnonzero(np.r_[True, sorted_values[row, 1:] != sorted_values[row, :-1]])
        ends = np.r_[starts[1:], length]
        mean_rank = (positions[starts] + positions[ends - 1]) / 2.0
        ranks[row, order[row]] = np.repeat(mean_rank, ends - starts)
    return ranks


def rowwise_pearson(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``first`` with the same row of ``second``: (R, M), (R, M) -> (R,).

    Rows whose variance is zero give NaN (the caller decides whether that is an error).
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    first = first - first.mean(axis=1, keepdims=True)
    second = second - second.mean(axis=1, keepdims=True)
    norms = np.sqrt((first ** 2).sum(axis=1) * (second ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (first * second).sum(axis=1) / np.where(norms > 0, norms, 1.0), np.nan)


def rowwise_spearman(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman correlation (Pearson of the average ranks) of each row pair: (R, M), (R, M) -> (R,)."""
    return rowwise_pearson(average_ranks(first), average_ranks(second))
