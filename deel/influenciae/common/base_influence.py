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
from abc import abstractmethod
from typing import Any, Optional, Tuple

import tensorflow as tf

from ..utils.nearest_neighbors import BaseNearestNeighbors, LinearNearestNeighbors
from ..utils.sorted_dict import ORDER
from ..utils.tf_operations import assert_batched_dataset, dataset_size, get_device, lazy_map, map_to_device
from .compat import order_given_as_nearest_neighbors
from .index_build import build_index
from .influence_index import InfluenceIndex
from .results import TopK
from .self_influence import SelfInfluenceCalculator, _check_k, _check_k_fits, _check_samples
from .train_streaming import TrainStreaming, ragged_by_batches
from .vector_store import CACHE, RecomputingVectorStore, VectorStore, build_vector_store

__all__ = ["BaseInfluenceCalculator", "SelfInfluenceCalculator", "CACHE"]


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

    def _index_configuration(self) -> dict:
        """The settings that determine this calculator's influence vectors beyond its class and its models' weights
        (a JSON-serialisable dict, part of an :class:`~deel.influenciae.common.InfluenceIndex`'s fingerprint);
        methods with such settings (learning rates, damping, normalisation...) override it."""
        return {}

    def build_index(self, train_set: tf.data.Dataset, path: str, dtype: str = "float16", shard_size: int = 10_000,
                    verbose: Optional[bool] = None) -> Optional[InfluenceIndex]:
        """Compute the training set's influence vectors once and store them on disk at ``path``, for many queries
        (``top_k``, ``influence_matrix``) without recomputing them; reopen the index in a later process with
        :meth:`InfluenceIndex.load(path, calculator) <deel.influenciae.common.InfluenceIndex.load>`.

        An interrupted build resumes when called again with the same arguments (the completed shards are kept and
        their batches are not recomputed); a complete index is returned without computing anything.

        Parameters
        ----------
        train_set
            Batched dataset of the N training samples, in a fixed order (the index's rows follow it).
        path
            Directory of the index (new, empty, or an index of this calculator).
        dtype
            Storage dtype of the vectors: ``"float16"`` (default, half the disk) or ``"float32"``.
        shard_size
            Rows per shard file; at most one shard's worth of vectors is held while building.
        verbose
            Progress bar; None: the calculator's ``verbose``.

        Returns
        -------
        InfluenceIndex or None
            The complete index: ``size`` N, ``top_k(test_set, k, order)`` ((T, k) values and int64 indices),
            ``influence_matrix(test_set)`` (T, N). Under a multi-worker strategy the chief writes the index and
            gets it; the other workers compute their share of every batch and get None.

        Raises
        ------
        ValueError
            Bad ``dtype`` or ``shard_size``, unbatched or empty ``train_set``, ``path`` holding something else than
            an index of this calculator with this ``dtype`` and ``shard_size``, or non-finite vectors.
        """
        return build_index(self, train_set, path, dtype, shard_size, verbose)

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
        return RecomputingVectorStore(self._compute_influence_vector, train_set, self._executor(device),
                                      save_influence_vector_ds_path).dataset()

    def _vector_store(self, train_set: tf.data.Dataset, cache: CACHE, load_path: Optional[str],
                      save_path: Optional[str], device: Optional[str]) -> VectorStore:
        """The training set's influence vectors, kept as ``cache`` says."""
        assert_batched_dataset(train_set, "train_set")
        return build_vector_store(cache, self._compute_influence_vector, train_set, self._executor(device),
                                  lambda: self._vectors_fit_in_memory(train_set), load_path, save_path)

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
        inf_vect_ds = self._vector_store(train_set, influence_vector_in_cache, load_influence_vector_path,
                                         save_influence_vector_path, device).dataset()
        result = lazy_map(dataset_to_evaluate,
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
        return self._pairwise_matrix(dataset_to_evaluate, train_set)

    def _pairwise_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        """Hook of :meth:`influence_matrix` (datasets already checked): (N_test, N_train), streaming the training
        set (methods override it where they have a cheaper form)."""
        return self._streamed_matrix(dataset_to_evaluate, train_set)

    def influence_matrix(self, test_set: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        """Influence of every training sample on every test sample, computed now: (T, N).

        Row t, column z is ``I(t, z)`` (positive: z is a proponent of t). One pass over ``train_set`` per chunk of
        test samples that fits ``memory_budget_bytes``; no training-side vectors are held.

        Parameters
        ----------
        test_set
            Batched dataset of the T samples to explain.
        train_set
            Batched dataset of the N training samples, in a fixed order.

        Raises
        ------
        ValueError
            If a dataset is empty or a value is not finite.
        """
        assert_batched_dataset(test_set, "test_set")
        assert_batched_dataset(train_set, "train_set")
        return self._pairwise_matrix(test_set, train_set)

    def influence_top_k(self, test_set: tf.data.Dataset, train_set: tf.data.Dataset, k: int = 5,
                        order: ORDER = ORDER.DESCENDING, return_samples: bool = False) -> TopK:
        """The k most (or least) influential training samples for every test sample, computed now.

        One streaming pass over ``train_set`` per chunk of test samples that fits ``memory_budget_bytes``; only
        k values per test sample are kept.

        Parameters
        ----------
        test_set
            Batched dataset of the T samples to explain (batches may differ in size).
        train_set
            Batched dataset of the N training samples, in a fixed order.
        k
            Number of training samples per test sample, 1 <= k <= N.
        order
            ``ORDER.DESCENDING`` (default): the strongest proponents first; ``ORDER.ASCENDING``: the strongest
            opponents first.
        return_samples
            Also return the training inputs.

        Returns
        -------
        TopK
            ``values`` (T, k), ``indices`` (T, k) int64 positions in ``train_set``, ``samples`` (T, k, *x_shape)
            or None. Ties keep the earlier training sample.
        """
        k = _check_k(k)
        if not isinstance(order, ORDER):
            raise TypeError(f"order must be an ORDER member, got {order!r}.")
        assert_batched_dataset(test_set, "test_set")
        assert_batched_dataset(train_set, "train_set")
        _check_k_fits(k, train_set)
        _, values, samples, indices = self._streamed_top_k(test_set, train_set, k, order, None)
        return TopK(values, indices, samples if return_samples else None)

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
        nearest_neighbors, order = order_given_as_nearest_neighbors(nearest_neighbors, order, ORDER)
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
        store = self._vector_store(train_set, influence_vector_in_cache, load_influence_vector_ds_path,
                                   save_influence_vector_ds_path, device)
        inf_vect_ds = store.dataset()
        size = dataset_size(train_set) if store.size is None else store.size
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
