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
    length = values.shape[1]
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    changes = sorted_values[:, 1:] != sorted_values[:, :-1]
    edge = np.ones((values.shape[0], 1), dtype=bool)
    positions = np.broadcast_to(np.arange(1, length + 1, dtype=np.float64), values.shape)
    # first and last sorted position of each entry's tie group, carried along the row
    first = np.maximum.accumulate(np.where(np.hstack([edge, changes]), positions, 0.0), axis=1)
    last = np.minimum.accumulate(np.where(np.hstack([changes, edge]), positions, np.inf)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=1)
    return ranks


def finite_array(name: str, values: object, ndim: int) -> np.ndarray:
    """``values`` as a float64 array of ``ndim`` dimensions, or a ``ValueError`` naming ``name`` and the index of
    the first non-finite value."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"{name} holds a non-finite value at index {tuple(int(i) for i in bad)}.")
    return array


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
