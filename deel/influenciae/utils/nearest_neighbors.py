"""Exact (linear scan) nearest-neighbour search over a dataset of influence vectors."""
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Tuple

import tensorflow as tf

from .sorted_dict import ORDER, initial_best_values, order_sign, stable_top_k


TopKState = Tuple[tf.Tensor, tf.Tensor, Any, tf.Tensor]


def initial_top_k_state(num_queries: Any, k: int, keys_spec: Any, d_type: tf.DType, order: ORDER) -> TopKState:
    """The state of a streaming top-k before any sample: ``(values (Q, k), indices (Q, k) of -1, keys (Q, k,
    *key_shape) of zeros, offset 0)``; ``keys_spec`` is the ``tf.TensorSpec`` structure of a batch of keys."""
    keys = tf.nest.map_structure(
        lambda spec: tf.zeros(tf.concat([tf.stack([num_queries, k]), tf.constant(spec.shape[1:].as_list(), tf.int32)],
                                        0), dtype=spec.dtype), keys_spec)
    return (initial_best_values(num_queries, k, d_type, order), tf.fill(tf.stack([num_queries, k]),
                                                                        tf.constant(-1, tf.int64)),
            keys, tf.constant(0, tf.int64))


def merge_top_k(state: TopKState, values: tf.Tensor, keys: Any, k: int, order: ORDER) -> TopKState:
    """Merge the next B samples of the stream into the k best of every query.

    Parameters
    ----------
    state
        ``(values (Q, k), indices (Q, k), keys (Q, k, *key_shape), offset)`` so far.
    values
        (Q, B) values of the B new samples for every query.
    keys
        (B, *key_shape) structure of the new samples' keys (e.g. training inputs), shared by every query.
    k, order
        Number kept per query and ``ORDER``; ties keep the earlier sample.

    Returns
    -------
    The new state; ``indices`` are positions in the stream (``offset`` counts the samples seen).
    """
    best_values, best_indices, best_keys, offset = state
    num_queries = tf.shape(values)[0]
    batch_len = tf.shape(values, out_type=tf.int64)[1]
    new_indices = tf.broadcast_to(offset + tf.range(batch_len), tf.shape(values, out_type=tf.int64))
    candidates = tf.concat([best_values, tf.cast(values, best_values.dtype)], axis=1)
    top_values, positions = stable_top_k(candidates, k, order)
    top_indices = tf.gather(tf.concat([best_indices, new_indices], axis=1), positions, batch_dims=1)
    # Keys: the kept ones (Q*k of them) followed by the batch's own (shared by every query).
    flat_positions = tf.where(positions < k, positions + k * tf.range(num_queries)[:, None],
                              positions - k + num_queries * k)

    def pick(kept, fresh):
        pool = tf.concat([tf.reshape(kept, tf.concat([[-1], tf.shape(kept)[2:]], 0)), tf.cast(fresh, kept.dtype)],
                         axis=0)
        return tf.gather(pool, flat_positions)

    return top_values, top_indices, tf.nest.map_structure(pick, best_keys, keys), offset + batch_len


class BaseNearestNeighbors(ABC):
    """Interface of the k-nearest-neighbour searches used by ``top_k``."""

    @abstractmethod
    def build(self, dataset: tf.data.Dataset, dot_product_fun: Callable, k: int, query_batch_size: Optional[int] = None,
              d_type: tf.DType = tf.float32, order: ORDER = ORDER.DESCENDING) -> None:
        """Index ``dataset`` (elements ``((x, y, ...), vectors)``) for queries by similarity ``dot_product_fun``."""

    @abstractmethod
    def query(self, vector_to_find: Any, batch_size: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        """Return ``(values (Q, k), samples (Q, k, *x_shape))`` for the Q query vectors."""


class LinearNearestNeighbors(BaseNearestNeighbors):
    """Exact top-k search by a streaming scan of every batch of the indexed dataset.

    Each query batch costs one pass over the indexed dataset (one similarity call per indexed batch) and
    keeps O(Q·k) state; queries may come in batches of any size. Ties keep the earlier indexed sample.
    """

    def __init__(self):
        self.dataset = None
        self.dot_product_fun = None
        self.k = None
        self.d_type = tf.float32
        self.order = ORDER.DESCENDING

    def build(self, dataset: tf.data.Dataset, dot_product_fun: Callable, k: int, query_batch_size: Optional[int] = None,
              d_type: tf.DType = tf.float32, order: ORDER = ORDER.DESCENDING) -> None:
        """Index a dataset.

        Parameters
        ----------
        dataset
            Batched dataset of ``((x, y, ...), vectors)``; ``vectors`` may be any structure that
            ``dot_product_fun`` understands.
        dot_product_fun
            ``f(queries, vectors) -> (Q, B)`` similarity between Q queries and the B samples of a batch.
        k
            Number of neighbours returned per query (>= 1).
        query_batch_size
            Accepted for compatibility; queries may have any batch size.
        d_type
            Dtype of the returned values.
        order
            ``ORDER.DESCENDING`` returns the most similar samples, ``ORDER.ASCENDING`` the least similar.
        """
        del query_batch_size
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        order_sign(order)
        self.dataset = dataset
        self.dot_product_fun = dot_product_fun
        self.k = int(k)
        self.d_type = tf.as_dtype(d_type)
        self.order = order

    def query(self, vector_to_find: Any, batch_size: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        """Return ``(values (Q, k), samples (Q, k, *x_shape))`` for the Q queries, best first."""
        values, samples, _ = self.query_with_indices(vector_to_find)
        return values, samples

    def query_with_indices(self, vector_to_find: Any) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Like :meth:`query`, also returning the positions (Q, k) of the samples in the indexed dataset.

        Works eagerly and inside ``tf.data``/``tf.function`` graphs.
        """
        if self.dataset is None:
            raise ValueError("Call build() before query().")
        num_queries = tf.shape(tf.nest.flatten(vector_to_find)[0])[0]
        initial = initial_top_k_state(num_queries, self.k, self.dataset.element_spec[0][0], self.d_type, self.order)

        def merge(state, element):
            batch, vectors = element
            values = tf.cast(self.dot_product_fun(vector_to_find, vectors), self.d_type)
            return merge_top_k(state, values, batch[0], self.k, self.order)

        values, indices, keys, _ = self.dataset.reduce(initial, merge)
        return values, keys, indices
