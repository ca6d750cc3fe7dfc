"""Where training-side influence vectors live between evaluation batches: the one implementation of ``CACHE``.

A store hands out the training set as a dataset of ``((x, y), vectors)`` batches, however the vectors are kept:

* :class:`MemoryVectorStore` (``CACHE.MEMORY``): computed once, in one pass, held in memory;
* :class:`DiskVectorStore` (``CACHE.DISK`` with a load path): read back from vectors saved earlier;
* :class:`RecomputingVectorStore` (``CACHE.NO_CACHE``, ``CACHE.DISK`` without a load path, or ``CACHE.MEMORY``
  above the memory budget): recomputed on every pass, streaming (memory of one batch).

Calculators never concatenate N × D vectors themselves: they ask :func:`build_vector_store`.
"""
import os
import warnings
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Callable, Optional, Tuple

import tensorflow as tf

from ..utils.tf_operations import assert_known_cardinality, map_to_device
from .executor import Executor, concat_structures, first_dim
from .model_wrappers import assert_finite


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


def save_dataset(dataset: tf.data.Dataset, path: str) -> None:
    """Save a dataset to ``path`` (``tf.data.Dataset.save``)."""
    dataset.save(path)


def load_dataset(path: str) -> tf.data.Dataset:
    """Load a dataset saved by :func:`save_dataset`.

    Raises
    ------
    FileNotFoundError
        If nothing was saved at ``path``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No saved dataset at {path!r}.")
    return tf.data.Dataset.load(path)


class VectorStore(ABC):
    """Training-side vectors of one training set.

    Attributes
    ----------
    size : int or None
        Number of training samples when known without another pass.
    """

    size: Optional[int] = None

    @abstractmethod
    def dataset(self) -> tf.data.Dataset:
        """Batches ``((x, y), vectors (B, D))`` of the training set, in its order."""


class MemoryVectorStore(VectorStore):
    """Every vector computed now, in one pass, and held (optionally saved to ``save_path`` as well).

    Attributes
    ----------
    vectors : Any
        (N, D) concatenated vectors (or a structure of such tensors).
    """

    def __init__(self, compute_vectors: Callable[[Tuple], Any], train_set: tf.data.Dataset, executor: Executor,
                 save_path: Optional[str] = None):
        batches, vectors, lengths = [], [], []
        for result, batch in executor.map_with_batches(compute_vectors, train_set, "influence vectors"):
            batches.append(batch)
            vectors.append(result)
            lengths.append(first_dim(batch))
        if not batches:
            raise ValueError("train_set is empty.")
        all_batches, self.vectors = concat_structures(batches), concat_structures(vectors)
        for tensor in tf.nest.flatten(self.vectors):
            assert_finite(tensor, "influence vectors")
        if save_path is not None:
            save_dataset(tf.data.Dataset.from_tensor_slices(self.vectors), save_path)
        self.size = sum(lengths)
        row_lengths = tf.constant(lengths, tf.int64)
        ragged = tf.nest.map_structure(lambda tensor: tf.RaggedTensor.from_row_lengths(tensor, row_lengths),
                                       (all_batches, self.vectors))
        self._dataset = tf.data.Dataset.from_tensor_slices(ragged)

    def dataset(self) -> tf.data.Dataset:
        return self._dataset


class DiskVectorStore(VectorStore):
    """Vectors saved earlier (unbatched, in the training set's order) read back batch by batch beside the samples;
    the training set must be batched regularly (all batches full but the last)."""

    def __init__(self, train_set: tf.data.Dataset, load_path: str):
        saved = load_dataset(load_path)
        first_batch_size = int(next(iter(train_set.map(lambda *batch: first_dim_tensor(batch)))))
        self._dataset = tf.data.Dataset.zip((train_set, saved.batch(first_batch_size)))

    def dataset(self) -> tf.data.Dataset:
        return self._dataset


class RecomputingVectorStore(VectorStore):
    """Vectors recomputed on every pass (lazily, on the executor's device); saved once to ``save_path`` if
    given."""

    def __init__(self, compute_vectors: Callable[[Tuple], Any], train_set: tf.data.Dataset, executor: Executor,
                 save_path: Optional[str] = None):
        self._dataset = map_to_device(train_set, lambda *batch: (batch, compute_vectors(batch)), executor.device)
        if save_path is not None:
            save_dataset(self._dataset.map(lambda _, vectors: vectors).unbatch(), save_path)

    def dataset(self) -> tf.data.Dataset:
        return self._dataset


def first_dim_tensor(structure: Any) -> tf.Tensor:
    """Number of rows of a batch structure, as a tensor (usable in graphs)."""
    return tf.shape(tf.nest.flatten(structure)[0])[0]


def build_vector_store(cache: CACHE, compute_vectors: Callable[[Tuple], Any], train_set: tf.data.Dataset,
                       executor: Executor, fits_in_memory: Callable[[], bool], load_path: Optional[str] = None,
                       save_path: Optional[str] = None) -> VectorStore:
    """The store that ``cache`` asks for.

    Parameters
    ----------
    cache
        See :class:`CACHE`.
    compute_vectors
        The vectors of one training batch: (B, D).
    train_set
        Batched training set, iterated in a fixed order.
    executor
        Runs the passes.
    fits_in_memory
        Whether the N × D vectors fit the memory budget; ``CACHE.MEMORY`` above it recomputes with a
        ``ResourceWarning``.
    load_path, save_path
        Saved vectors to read (``CACHE.DISK``) and where to save the computed ones.
    """
    if not isinstance(cache, CACHE):
        raise TypeError(f"influence_vector_in_cache must be a CACHE member, got {cache!r}.")
    if cache == CACHE.MEMORY:
        if save_path is not None or fits_in_memory():
            return MemoryVectorStore(compute_vectors, train_set, executor, save_path)
        warnings.warn(f"The training set's influence vectors would take more than memory_budget_bytes="
                      f"{executor.memory_budget_bytes}: they are recomputed for every batch to evaluate instead of "
                      "held in memory (CACHE.MEMORY). Raise the calculator's memory_budget_bytes to hold them.",
                      ResourceWarning, stacklevel=4)
    assert_known_cardinality(train_set, "train_set")
    if cache == CACHE.DISK and load_path is not None:
        return DiskVectorStore(train_set, load_path)
    return RecomputingVectorStore(compute_vectors, train_set, executor, save_path)
