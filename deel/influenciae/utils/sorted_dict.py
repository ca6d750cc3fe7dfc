"""Streaming top-k selection.

``ORDER`` says which end of the ranking is kept and :class:`BatchSort` keeps, for several independent
queries at once, the k best (key, value) pairs seen so far. Ties are stable: among equal values the
entry seen first wins (entries already kept beat new ones, and earlier positions in a batch beat later
ones).
"""
from enum import Enum
from typing import Sequence, Tuple

import tensorflow as tf


class ORDER(Enum):
    """Which end of a ranking to keep: the smallest values (``ASCENDING``) or the largest (``DESCENDING``)."""

    ASCENDING = 1
    DESCENDING = 2


def order_sign(order: ORDER) -> float:
    """Return +1 for ``ORDER.DESCENDING`` and -1 for ``ORDER.ASCENDING``.

    Multiplying values by this sign turns every selection into a "keep the largest" selection.
    """
    if not isinstance(order, ORDER):
        raise TypeError(f"order must be a member of ORDER (ASCENDING or DESCENDING), got {order!r}.")
    return 1.0 if order == ORDER.DESCENDING else -1.0


def stable_top_k(values: tf.Tensor, k: int, order: ORDER = ORDER.DESCENDING) -> Tuple[tf.Tensor, tf.Tensor]:
    """Select the k best entries of every row, earlier positions winning ties.

    Parameters
    ----------
    values
        Tensor of shape (Q, n), one row per query.
    k
        Number of entries to keep, ``k <= n``.
    order
        ``ORDER.DESCENDING`` keeps the largest values, ``ORDER.ASCENDING`` the smallest.

    Returns
    -------
    top_values, positions
        Tensors of shape (Q, k): the kept values (best first) and their column positions in ``values``.
    """
    sign = tf.constant(order_sign(order), dtype=values.dtype)
    # tf.math.top_k returns the lower index first among equal values, hence the stable ties.
    top = tf.math.top_k(sign * values, k=k, sorted=True)
    return sign * top.values, top.indices


def initial_best_values(num_queries, k: int, dtype: tf.DType, order: ORDER) -> tf.Tensor:
    """Values of shape (num_queries, k) that every real value beats: -inf when descending, +inf when ascending."""
    fill = -float("inf") if order == ORDER.DESCENDING else float("inf")
    return tf.fill(tf.stack([num_queries, k]), tf.constant(fill, dtype=dtype))


class BatchSort:
    """Keep, for each of ``k_shape[0]`` queries, the ``k_shape[1]`` best (key, value) pairs of a stream.

    Parameters
    ----------
    batch_shape
        Shape of one key (e.g. the shape of one training input).
    k_shape
        ``(Q, k)``: number of independent queries and number of pairs kept per query.
    dtype
        Dtype of the values (and of the keys unless ``key_dtype`` is given).
    order
        ``ORDER.DESCENDING`` (default) keeps the largest values, ``ORDER.ASCENDING`` the smallest.
    key_dtype
        Dtype of the keys; defaults to ``dtype``.

    Notes
    -----
    Until k pairs were added, the missing slots hold zero keys and -inf (descending) or +inf (ascending)
    values.
    """

    def __init__(self, batch_shape: Sequence[int], k_shape: Sequence[int], dtype: tf.DType = tf.float32,
                 order: ORDER = ORDER.DESCENDING, key_dtype: tf.DType = None):
        if len(k_shape) != 2 or int(k_shape[1]) < 1:
            raise ValueError(f"k_shape must be (number of queries, k) with k >= 1, got {tuple(k_shape)}.")
        order_sign(order)
        self.batch_shape = tuple(int(d) for d in batch_shape)
        self.k_shape = (int(k_shape[0]), int(k_shape[1]))
        self.dtype = tf.as_dtype(dtype)
        self.key_dtype = tf.as_dtype(key_dtype) if key_dtype is not None else self.dtype
        self.order = order
        self.best_batch = None
        self.best_values = None
        self.reset()

    def reset(self) -> None:
        """Forget every pair added so far."""
        self.best_batch = tf.zeros(self.k_shape + self.batch_shape, dtype=self.key_dtype)
        self.best_values = initial_best_values(self.k_shape[0], self.k_shape[1], self.dtype, self.order)

    def add_all(self, batch_key: tf.Tensor, batch_values: tf.Tensor) -> None:
        """Merge a batch of candidates into the kept pairs.

        Parameters
        ----------
        batch_key
            Tensor of shape (Q, m, *batch_shape): the candidate keys of every query.
        batch_values
            Tensor of shape (Q, m): their values.
        """
        batch_values = tf.cast(batch_values, self.dtype)
        batch_key = tf.cast(batch_key, self.key_dtype)
        if batch_values.shape.rank != 2 or batch_key.shape[:2] != batch_values.shape:
            raise ValueError("batch_key must have shape (Q, m, *batch_shape) and batch_values shape (Q, m); got "
                             f"{batch_key.shape} and {batch_values.shape}.")
        candidate_values = tf.concat([self.best_values, batch_values], axis=1)
        candidate_keys = tf.concat([self.best_batch, batch_key], axis=1)
        self.best_values, positions = stable_top_k(candidate_values, self.k_shape[1], self.order)
        self.best_batch = tf.gather(candidate_keys, positions, batch_dims=1)

    def get(self) -> Tuple[tf.Tensor, tf.Tensor]:
        """Return ``(keys (Q, k, *batch_shape), values (Q, k))``, best first."""
        return self.best_batch, self.best_values
