"""Self-influence: the interface of every method that scores training samples on their own.

:class:`SelfInfluenceCalculator` asks one hook of a method, ``_compute_influence_value_from_batch(batch) -> (B, 1)``,
and gives the eager API (``self_influence`` (N,), ``self_influence_top_k`` a :class:`~.results.TopK`) and the
reference's dataset-returning methods.
"""
from abc import ABC, abstractmethod
from typing import Any, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from ..utils.nearest_neighbors import LinearNearestNeighbors
from ..utils.sorted_dict import ORDER
from ..utils.tf_operations import assert_batched_dataset, dataset_size, map_to_device
from .distribution import calculator_strategy
from .executor import Executor
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel, assert_finite
from .results import TopK
from .vector_store import load_dataset, save_dataset


def _check_k(k: int) -> int:
    """``k`` as a Python int (NumPy integers accepted); ``ValueError`` unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    return int(k)


def _check_k_fits(k: int, train_set: tf.data.Dataset) -> None:
    """``ValueError`` before any computation when ``k`` exceeds the number of training samples (when it can be
    known without a pass of computations: a batched dataset of known cardinality)."""
    try:
        size = dataset_size(train_set)
    except (TypeError, ValueError):
        return
    if k > size:
        raise ValueError(f"k={k} is larger than the number of training samples ({size}).")


def _check_samples(calculator: Any, dataset: tf.data.Dataset, name: str) -> None:
    """Read ``dataset`` once and check every batch before a lazily computed result is returned: finite floating
    values (:func:`compute_batches`) and inputs shaped like those of the calculator's models."""
    models = getattr(calculator, "models", None) or [getattr(calculator, "model", None)]
    models = [model for model in models if isinstance(model, BaseInfluenceModel)]
    for batch in Executor().batches(dataset, name=name):
        for model in models:
            model.check_batch(batch)


class SelfInfluenceCalculator(ABC):
    """Interface of the methods that score each training sample on its own (self-influence).

    Each method defines a score ``s(z)`` per training sample z (for influence functions ``s(z) = I(z, z)``, for
    boundary methods minus a distance). Sign convention: **a larger score means a more unusual sample** (more
    self-influential, closer to the decision boundary); mislabeled samples and outliers rank first with
    ``ORDER.DESCENDING``.
    """

    @abstractmethod
    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence of the samples of one batch: (B, 1)."""

    def compute_influence_values(self, train_set: tf.data.Dataset, device: Optional[str] = None) -> tf.data.Dataset:
        """Self-influence of every training sample, lazily.

        Parameters
        ----------
        train_set
            Batched dataset of ``(x, y)`` samples.
        device
            Device to compute on (default: a GPU if visible, else the CPU).

        Returns
        -------
        tf.data.Dataset
            Elements ``((x, y), values)`` with ``values`` of shape (B, 1).
        """
        assert_batched_dataset(train_set, "train_set")
        return map_to_device(train_set, lambda *batch: (batch, self._compute_influence_value_from_batch(batch)),
                             device)

    @property
    def strategy(self) -> Optional[tf.distribute.Strategy]:
        """The ``tf.distribute.Strategy`` this calculator's passes over data run under: its influence model's
        (``InfluenceModel(..., strategy=...)``, or the strategy in scope when the model was wrapped); None: one
        device."""
        return calculator_strategy(self)

    def _executor(self, device: Optional[str] = None) -> Executor:
        """The executor of this calculator's passes (its ``verbose``, ``memory_budget_bytes`` and strategy)."""
        return Executor(device, getattr(self, "verbose", None),
                        getattr(self, "memory_budget_bytes", DEFAULT_MEMORY_BUDGET_BYTES), self.strategy)

    def self_influence(self, train_set: tf.data.Dataset, device: Optional[str] = None) -> tf.Tensor:
        """Self-influence of every training sample, computed now: (N,) (``train_set`` and ``device`` as in
        :meth:`compute_influence_values`).

        Raises
        ------
        ValueError
            If the dataset is empty or a value is not finite.
        """
        assert_batched_dataset(train_set, "train_set")
        values = self._executor(device).concat(self._compute_influence_value_from_batch, train_set, "self-influence",
                                               "train_set")
        assert_finite(values, "self-influence values")
        return tf.reshape(values, (-1,))

    def _compute_influence_values(self, train_set: tf.data.Dataset, device: Optional[str] = None) -> tf.Tensor:
        """Self-influence of every training sample as a column (N, 1) (see :meth:`self_influence`)."""
        return self.self_influence(train_set, device)[:, None]

    def self_influence_top_k(self, train_set: tf.data.Dataset, k: int, order: ORDER = ORDER.DESCENDING,
                             return_samples: bool = False) -> TopK:
        """The k training samples of highest (or lowest) self-influence, computed now.

        Parameters
        ----------
        train_set
            Batched dataset of ``(x, y)`` samples.
        k
            Number of samples, 1 <= k <= N.
        order
            ``ORDER.DESCENDING`` (default): highest first; ``ORDER.ASCENDING``: lowest first.
        return_samples
            Also gather the training inputs (a second pass over ``train_set``).

        Returns
        -------
        TopK
            ``values`` (k,), ``indices`` (k,) int64 positions in ``train_set``, ``samples`` (k, *x_shape) or None.
            Ties keep the earlier sample.
        """
        k = _check_k(k)
        assert_batched_dataset(train_set, "train_set")
        _check_k_fits(k, train_set)
        values = self.self_influence(train_set)
        if k > int(values.shape[0]):
            raise ValueError(f"k={k} is larger than the number of training samples ({int(values.shape[0])}).")
        if not isinstance(order, ORDER):
            raise TypeError(f"order must be an ORDER member, got {order!r}.")
        keys = values if order == ORDER.DESCENDING else -values
        _, indices = tf.math.top_k(keys, k=k, sorted=True)
        indices = tf.cast(indices, tf.int64)
        samples = gather_samples(train_set, indices) if return_samples else None
        return TopK(tf.gather(values, indices), indices, samples)

    def compute_top_k_from_training_dataset(self, train_set: tf.data.Dataset, k: int,
                                            order: ORDER = ORDER.DESCENDING, return_indices: bool = False
                                            ) -> Union[Tuple[tf.Tensor, tf.Tensor],
                                                       Tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        """The k training samples of highest (or lowest) self-influence, in one streaming pass.

        Parameters
        ----------
        train_set
            Batched dataset of ``(x, y)`` samples.
        k
            Number of samples to return (1 <= k <= N).
        order
            ``ORDER.DESCENDING`` (default): highest self-influence first; ``ORDER.ASCENDING``: lowest first.
        return_indices
            Also return the samples' positions in ``train_set``.

        Returns
        -------
        samples, values[, indices]
            ``samples`` (k, *x_shape) the training inputs, ``values`` (k,) their self-influence,
            ``indices`` (k,) int64 positions. Ties keep the earlier sample.

        Raises
        ------
        ValueError
            If ``k < 1`` or ``k`` exceeds the number of training samples.
        """
        k = _check_k(k)
        assert_batched_dataset(train_set, "train_set")
        _check_k_fits(k, train_set)
        _check_samples(self, train_set, "train_set")
        values_ds = self.compute_influence_values(train_set)
        searcher = LinearNearestNeighbors()
        searcher.build(values_ds, lambda _, values: tf.reshape(values, (1, -1)), k,
                       d_type=values_ds.element_spec[1].dtype, order=order)
        values, samples, indices = searcher.query_with_indices(tf.zeros((1, 1)))
        if bool(tf.reduce_any(indices < 0)) or not bool(tf.reduce_all(tf.math.is_finite(values))):
            # Non-finite values are left out of the search: recompute them eagerly, where the method's own checks
            # say where they come from (e.g. which TracIn checkpoint), before blaming k.
            self._compute_influence_values(train_set)
            raise ValueError(f"k={k} is larger than the number of training samples "
                             f"({int(tf.reduce_sum(tf.cast(indices >= 0, tf.int32)))}).")
        assert_finite(values, "self-influence values")
        result = (samples[0], values[0])
        return result + (indices[0],) if return_indices else result

    _save_dataset = staticmethod(save_dataset)
    _load_dataset = staticmethod(load_dataset)


def gather_samples(train_set: tf.data.Dataset, indices: tf.Tensor) -> Any:
    """The inputs of the training samples at ``indices`` (any shape of int64 positions in ``train_set``'s order):
    a tensor (or structure) shaped ``indices.shape + x_shape``, in one pass keeping only the wanted rows."""
    flat = tf.reshape(indices, (-1,))
    found, offset = [], 0
    for batch in Executor().batches(train_set):
        size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
        inside = tf.logical_and(flat >= offset, flat < offset + size)
        rows = tf.boolean_mask(flat, inside) - offset
        found.append((tf.boolean_mask(tf.range(tf.size(flat)), inside),
                      tf.nest.map_structure(lambda tensor, rows=rows: tf.gather(tensor, rows), batch[0])))
        offset += size
    positions = tf.concat([position for position, _ in found], axis=0)
    rows = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *[part for _, part in found])
    order = tf.argsort(positions)
    return tf.nest.map_structure(
        lambda tensor: tf.reshape(tf.gather(tensor, order), tf.concat([tf.shape(indices), tf.shape(tensor)[1:]], 0)),
        rows)
