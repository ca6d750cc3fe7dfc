"""Generic machinery shared by every influence method: values, batches, top-k, caching.

A method implements a few small hooks and inherits every public method:

* :class:`SelfInfluenceCalculator`: ``_compute_influence_value_from_batch(batch) -> (B, 1)``.
* :class:`BaseInfluenceCalculator` adds the inner-product structure of influence methods::

      value(t, z) = < preprocess(t), influence_vector(z) >        (or any similarity the method defines)

  with hooks ``_compute_influence_vector(batch) -> (B, D)``, ``_preprocess_samples(batch) -> (B_t, D)`` and
  ``_estimate_influence_value_from_influence_vector(preprocessed (B_t, D), vectors (B_tr, D)) -> (B_t, B_tr)``.

Datasets are batched ``tf.data`` datasets of ``(x, y)`` (or ``(x, y, sample_weight)``) tuples. Results keep the
reference's structures: datasets of ``((x, y), values)`` and friends.
"""
import os
import warnings
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from ..utils.nearest_neighbors import BaseNearestNeighbors, LinearNearestNeighbors
from ..utils.sorted_dict import ORDER
from ..utils.tf_operations import (assert_batched_dataset, assert_known_cardinality, compute_batches, dataset_size,
                                   get_device, map_to_device)
from ..utils.progress import progress_bar
from .model_wrappers import BaseInfluenceModel, assert_finite
from .train_streaming import TrainStreaming, ragged_by_batches


class CACHE(Enum):
    """Where training-side influence vectors are kept between evaluation batches.

    * ``MEMORY``: computed once per call and held in memory (default, fastest).
    * ``DISK``: loaded from a path written earlier (``save_influence_vector_path``); without a load path they
      are computed lazily.
    * ``NO_CACHE``: recomputed for every evaluation batch (least memory).
    """

    MEMORY = 0
    DISK = 1
    NO_CACHE = 2


def _first_dim(structure: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(structure)[0])[0]


def _concat(parts: list) -> Any:
    return tf.nest.map_structure(lambda *tensors: tf.concat(tensors, axis=0), *parts)


def _batch_count(dataset: tf.data.Dataset) -> Optional[int]:
    """Number of batches, or None when unknown."""
    count = int(tf.data.experimental.cardinality(dataset))
    return count if count >= 0 else None


def _check_k(k: int) -> int:
    """``k`` as a Python int (NumPy integers accepted); ``ValueError`` unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    return int(k)


def _check_samples(calculator: Any, dataset: tf.data.Dataset, name: str) -> None:
    """Read ``dataset`` once and check every batch before a lazily computed result is returned: finite floating
    values (:func:`compute_batches`) and inputs shaped like those of the calculator's models."""
    models = getattr(calculator, "models", None) or [getattr(calculator, "model", None)]
    models = [model for model in models if isinstance(model, BaseInfluenceModel)]
    for batch in compute_batches(dataset, name):
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

    def _compute_influence_values(self, train_set: tf.data.Dataset, device: Optional[str] = None) -> tf.Tensor:
        """Self-influence of every training sample, concatenated: (N, 1).

        Raises
        ------
        ValueError
            If a value is not finite.
        """
        assert_batched_dataset(train_set, "train_set")
        # Eager loop over batches: the hooks call compiled kernels, and this avoids re-instantiating a
        # tf.data map function per call (a fixed ~0.1 s that dominates on small data).
        with tf.device(get_device(device)):
            values = [self._compute_influence_value_from_batch(tuple(batch))
                      for batch in progress_bar(compute_batches(train_set), _batch_count(train_set), "self-influence",
                                                getattr(self, "verbose", None))]
        if not values:
            raise ValueError("train_set is empty.")
        values = tf.concat(values, axis=0)
        assert_finite(values, "self-influence values")
        return values

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

    @staticmethod
    def _save_dataset(dataset: tf.data.Dataset, path: str) -> None:
        """Save a dataset to ``path`` (``tf.data.Dataset.save``)."""
        dataset.save(path)

    @staticmethod
    def _load_dataset(path: str) -> tf.data.Dataset:
        """Load a dataset saved by :meth:`_save_dataset`.

        Raises
        ------
        FileNotFoundError
            If nothing was saved at ``path``.
        """
        if not os.path.exists(path):
            raise FileNotFoundError(f"No saved dataset at {path!r}.")
        return tf.data.Dataset.load(path)


class BaseInfluenceCalculator(TrainStreaming, SelfInfluenceCalculator):
    """Base of the methods whose influence is a similarity between a test-side representation and a
    training-side influence vector (influence functions, TracIn, representer points, Arnoldi).

    The influence of training sample z on test sample t is ``I(t, z) = < φ(t), v(z) >`` where ``v(z)`` (D,) is
    z's influence vector (``_compute_influence_vector``) and ``φ(t)`` (D,) the test-side representation
    (``_preprocess_samples``); self-influence is ``I(z, z)``. Sign convention shared by every method: **a positive
    value means z is a proponent of t** (it pushed the model towards its behaviour on t: for influence functions,
    removing z would increase the loss on t); a negative value means z is an opponent. ``top_k`` with
    ``ORDER.DESCENDING`` returns the strongest proponents, with ``ORDER.ASCENDING`` the strongest opponents.
    """

    @abstractmethod
    def _compute_influence_vector(self, train_samples: Tuple) -> Any:
        """Influence vectors of one batch of training samples: (B, D) (or a structure of such tensors)."""

    @abstractmethod
    def _preprocess_samples(self, samples: Tuple) -> Any:
        """Test-side representation of one batch of samples to evaluate: (B_t, D) (or a structure)."""

    @abstractmethod
    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: Any,
                                                        influence_vector: Any) -> tf.Tensor:
        """Influence of every training sample on every test sample: (B_t, B_tr)."""

    def _estimate_individual_influence_values_from_batch(self, train_samples: Tuple,
                                                         samples_to_evaluate: Tuple) -> tf.Tensor:
        """Influence of every sample of a training batch on every sample of a test batch: (B_t, B_tr)."""
        return self._estimate_influence_value_from_influence_vector(self._preprocess_samples(samples_to_evaluate),
                                                                    self._compute_influence_vector(train_samples))

    def _estimate_influence_values_from_influence_vector(self, samples_to_evaluate: Tuple,
                                                         influence_vector: Any) -> tf.Tensor:
        """Preprocess a test batch and compare it with given influence vectors: (B_t, B_tr)."""
        return self._estimate_influence_value_from_influence_vector(self._preprocess_samples(samples_to_evaluate),
                                                                    influence_vector)

    # Influence vectors ----------------------------------------------------------------------------
    def compute_influence_vector(self, train_set: tf.data.Dataset, save_influence_vector_ds_path: Optional[str] = None,
                                 device: Optional[str] = None) -> tf.data.Dataset:
        """Influence vectors of every training sample, lazily.

        Parameters
        ----------
        train_set
            Batched dataset of ``(x, y)`` samples.
        save_influence_vector_ds_path
            If given, the vectors (unbatched, without the samples) are computed now and saved there.
        device
            Device to compute on.

        Returns
        -------
        tf.data.Dataset
            Elements ``((x, y), vectors)`` with ``vectors`` of shape (B, D).
        """
        assert_batched_dataset(train_set, "train_set")
        dataset = map_to_device(train_set, lambda *batch: (batch, self._compute_influence_vector(batch)), device)
        if save_influence_vector_ds_path is not None:
            self._save_dataset(dataset.map(lambda _, vectors: vectors).unbatch(), save_influence_vector_ds_path)
        return dataset

    def _materialized_influence_vectors(self, train_set: tf.data.Dataset,
                                        save_path: Optional[str]) -> Tuple[tf.data.Dataset, int, Any]:
        """Compute every influence vector once; return the dataset ``((x, y), vectors)`` built from memory,
        the number of samples and the concatenated vectors."""
        batches, vectors, lengths = [], [], []
        for batch in progress_bar(compute_batches(train_set), _batch_count(train_set), "influence vectors",
                                  getattr(self, "verbose", None)):
            batches.append(tuple(batch))
            vectors.append(self._compute_influence_vector(tuple(batch)))
            lengths.append(int(_first_dim(batch)))
        if not batches:
            raise ValueError("train_set is empty.")
        all_batches, all_vectors = _concat(batches), _concat(vectors)
        for tensor in tf.nest.flatten(all_vectors):
            assert_finite(tensor, "influence vectors")
        if save_path is not None:
            self._save_dataset(tf.data.Dataset.from_tensor_slices(all_vectors), save_path)
        row_lengths = tf.constant(lengths, tf.int64)
        ragged = tf.nest.map_structure(lambda tensor: tf.RaggedTensor.from_row_lengths(tensor, row_lengths),
                                       (all_batches, all_vectors))
        dataset = tf.data.Dataset.from_tensor_slices(ragged)
        return dataset, sum(lengths), all_vectors

    def _influence_vector_dataset(self, train_set: tf.data.Dataset, cache: CACHE, load_path: Optional[str],
                                  save_path: Optional[str], device: Optional[str]) -> Tuple[tf.data.Dataset, int]:
        """The dataset of ``((x, y), vectors)`` to compare test batches with, and the number of samples (or -1)."""
        assert_batched_dataset(train_set, "train_set")
        if not isinstance(cache, CACHE):
            raise TypeError(f"influence_vector_in_cache must be a CACHE member, got {cache!r}.")
        if cache == CACHE.MEMORY:
            if save_path is not None or self._vectors_fit_in_memory(train_set):
                dataset, size, _ = self._materialized_influence_vectors(train_set, save_path)
                return dataset, size
            warnings.warn(f"The training set's influence vectors would take more than memory_budget_bytes="
                          f"{self.memory_budget_bytes}: they are recomputed for every batch to evaluate instead of "
                          "held in memory (CACHE.MEMORY). Raise the calculator's memory_budget_bytes to hold them.",
                          ResourceWarning, stacklevel=3)
        assert_known_cardinality(train_set, "train_set")
        if cache == CACHE.DISK and load_path is not None:
            saved = self._load_dataset(load_path)
            first_batch_size = int(next(iter(train_set.map(lambda *batch: _first_dim(batch)))))
            return tf.data.Dataset.zip((train_set, saved.batch(first_batch_size))), -1
        return self.compute_influence_vector(train_set, save_path, device), -1

    # Pairwise values ------------------------------------------------------------------------------
    def _estimate_inf_values_with_inf_vect_dataset(self, inf_vect_ds: tf.data.Dataset, samples_to_evaluate: Tuple,
                                                   device: Optional[str] = None) -> Tuple[Tuple, tf.data.Dataset]:
        """Compare one test batch with every batch of ``((x, y), vectors)``.

        Returns
        -------
        samples_to_evaluate, inner
            ``inner`` has elements ``((x_train, y_train), values (B_t, B_tr))``.
        """
        preprocessed = self._preprocess_samples(samples_to_evaluate)
        inner = map_to_device(
            inf_vect_ds,
            lambda batch, vectors: (batch, self._estimate_influence_value_from_influence_vector(preprocessed, vectors)),
            device)
        return samples_to_evaluate, inner

    def estimate_influence_values_in_batches(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset,
                                             influence_vector_in_cache: CACHE = CACHE.MEMORY,
                                             load_influence_vector_path: Optional[str] = None,
                                             save_influence_vector_path: Optional[str] = None,
                                             save_influence_value_path: Optional[str] = None,
                                             device: Optional[str] = None) -> tf.data.Dataset:
        """Influence of every training sample on every sample to evaluate, batch against batch.

        Parameters
        ----------
        dataset_to_evaluate
            Batched dataset of test samples ``(x, y)``.
        train_set
            Batched dataset of training samples; iterated in a fixed order (do not reshuffle it per iteration).
        influence_vector_in_cache
            See :class:`CACHE`. With ``MEMORY`` the training vectors are computed once, now.
        load_influence_vector_path
            With ``CACHE.DISK``: where vectors saved earlier are read (the train set must be in the same order
            and batched regularly: all batches full but the last).
        save_influence_vector_path
            Save the training vectors there.
        save_influence_value_path
            Compute everything now and save the values of test batch i under ``{path}/batch_{i:06d}``.
        device
            Device to compute on.

        Returns
        -------
        tf.data.Dataset
            Elements ``((x_test, y_test), inner)`` where ``inner`` is a dataset of
            ``((x_train, y_train), values)`` with ``values`` of shape (B_test, B_train).
        """
        assert_batched_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        _check_samples(self, dataset_to_evaluate, "dataset_to_evaluate")  # the values are computed lazily
        inf_vect_ds, _ = self._influence_vector_dataset(train_set, influence_vector_in_cache,
                                                        load_influence_vector_path, save_influence_vector_path, device)
        result = dataset_to_evaluate.map(
            lambda *batch: self._estimate_inf_values_with_inf_vect_dataset(inf_vect_ds, batch, device))
        if save_influence_value_path is not None:
            for index, (_, inner) in enumerate(result):
                self._save_dataset(inner, os.path.join(save_influence_value_path, f"batch_{index:06d}"))
        return result

    def estimate_influence_values_matrix(self, dataset_to_evaluate: tf.data.Dataset,
                                         train_set: tf.data.Dataset) -> tf.Tensor:
        """All pairwise influence values as one matrix (N_test, N_train), in one pass over the training set (per
        chunk of test samples that fits ``memory_budget_bytes``); no training-side vectors are held.

        Raises
        ------
        ValueError
            If a value is not finite.
        """
        assert_batched_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        assert_batched_dataset(train_set, "train_set")
        return self._streamed_matrix(dataset_to_evaluate, train_set)

    # Top-k ----------------------------------------------------------------------------------------
    def top_k(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset, k: int = 5,
              nearest_neighbors: Optional[BaseNearestNeighbors] = None,
              influence_vector_in_cache: CACHE = CACHE.MEMORY, load_influence_vector_ds_path: Optional[str] = None,
              save_influence_vector_ds_path: Optional[str] = None, save_top_k_ds_path: Optional[str] = None,
              order: ORDER = ORDER.DESCENDING, d_type: tf.DType = tf.float32, device: Optional[str] = None,
              return_indices: bool = False) -> tf.data.Dataset:
        """The k most (or least) influential training samples for every sample to evaluate.

        With the defaults (``CACHE.MEMORY``, no vector paths, the exact search) the result is computed now, in one
        pass over the training set per chunk of test samples that fits ``memory_budget_bytes``: only the test side
        (T × D) and k values per test sample are held, never the N × D training vectors. Otherwise the training
        vectors are cached as ``influence_vector_in_cache`` says and the search runs lazily per test batch.

        Parameters
        ----------
        dataset_to_evaluate
            Batched dataset of test samples; batches may differ in size (e.g. a short last batch).
        train_set
            Batched dataset of training samples, in a fixed order.
        k
            Number of training samples per test sample, 1 <= k <= N_train.
        nearest_neighbors
            Search strategy (default: an exact :class:`LinearNearestNeighbors`). An ``ORDER`` given here (fourth
            positional argument) is taken as ``order``.
        influence_vector_in_cache, load_influence_vector_ds_path, save_influence_vector_ds_path
            See :meth:`estimate_influence_values_in_batches`.
        save_top_k_ds_path
            Compute everything now and save the result dataset there.
        order
            ``ORDER.DESCENDING``: largest influence first (proponents); ``ORDER.ASCENDING``: smallest first.
        d_type
            Dtype of the returned values.
        device
            Device to compute on.
        return_indices
            Also return the positions of the training samples in ``train_set``.

        Returns
        -------
        tf.data.Dataset
            Elements ``((x_test, y_test), values (B_t, k), train_inputs (B_t, k, *x_shape))``, plus
            ``indices (B_t, k)`` (int64) when ``return_indices``.

        Raises
        ------
        ValueError
            If ``k < 1`` or ``k > N_train``.
        """
        k = _check_k(k)
        if isinstance(nearest_neighbors, ORDER):
            # top_k(test, train, k, ORDER.X): the order given positionally, as in the reference's README.
            nearest_neighbors, order = None, nearest_neighbors
        assert_batched_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        if nearest_neighbors is None and influence_vector_in_cache == CACHE.MEMORY and \
                load_influence_vector_ds_path is None and save_influence_vector_ds_path is None:
            assert_batched_dataset(train_set, "train_set")
            with tf.device(get_device(device)):
                batches, values, samples, indices = self._streamed_top_k(dataset_to_evaluate, train_set, k, order,
                                                                         tf.as_dtype(d_type))
            per_sample = (values, samples, indices) if return_indices else (values, samples)
            result = ragged_by_batches(batches, *per_sample)
            if save_top_k_ds_path is not None:
                self._save_dataset(result, save_top_k_ds_path)
            return result
        _check_samples(self, dataset_to_evaluate, "dataset_to_evaluate")  # the search runs lazily
        inf_vect_ds, size = self._influence_vector_dataset(train_set, influence_vector_in_cache,
                                                           load_influence_vector_ds_path,
                                                           save_influence_vector_ds_path, device)
        size = dataset_size(train_set) if size < 0 else size
        if k > size:
            raise ValueError(f"k={k} is larger than the number of training samples ({size}).")
        searcher = LinearNearestNeighbors() if nearest_neighbors is None else nearest_neighbors
        searcher.build(inf_vect_ds, self._estimate_influence_value_from_influence_vector, k, d_type=d_type,
                       order=order)

        def search(*batch):
            preprocessed = self._preprocess_samples(batch)
            if return_indices:
                values, samples, indices = searcher.query_with_indices(preprocessed)
                return batch, values, samples, indices
            values, samples = searcher.query(preprocessed)
            return batch, values, samples

        result = map_to_device(dataset_to_evaluate, search, device)
        if save_top_k_ds_path is not None:
            self._save_dataset(result, save_top_k_ds_path)
        return result
