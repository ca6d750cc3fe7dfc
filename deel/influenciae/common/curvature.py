"""Curvature operators: the model, the data and products with the curvature, apart from the solvers.

A :class:`CurvatureOperator` is the mean curvature ``C`` (P×P) of the per-sample loss over a dataset with respect
to the watched weights, offered as products ``C V`` on (P, K) columns and, when it can be formed, as a dense sum.
:class:`HessianOperator` is the Hessian (forward-over-backward products; for the dense matrix, the batch-wise
Jacobian of the gradient on small models and products on unit vectors on large ones); Gauss–Newton and Fisher
(:mod:`.fisher`) and Kronecker-factored curvature are further operators. Solvers (:mod:`.ihvp_base`) only see an
operator and vectors.
"""
from abc import ABC, abstractmethod
from typing import Any, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..utils.batch_checks import compute_batches
from ..utils.progress import LOGGER, progress_bar
from ..utils.tf_operations import assert_batched_dataset, assert_known_cardinality, dataset_size
from .executor import Executor
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_wrappers import BaseInfluenceModel


class CurvatureOperator(ABC):
    """Mean curvature of the per-sample loss over a dataset, as products with (P, K) columns.

    Attributes
    ----------
    model : BaseInfluenceModel
        Watched weights and loss.
    nb_params : int
        P.
    dtype : tf.DType
        dtype of the products.
    """

    def __init__(self, model: BaseInfluenceModel):
        self.model = model
        self.nb_params = model.nb_params
        self.dtype = model.dtype

    @abstractmethod
    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``C V``: (P, K) -> (P, K)."""

    def dense_sum(self) -> Tuple[tf.Tensor, int]:
        """``(Σ_samples C_i (P, P), number of samples)`` when the operator can form its matrix."""
        raise NotImplementedError(f"{type(self).__name__} cannot form its dense matrix.")


class HessianOperator(CurvatureOperator):
    """The mean Hessian of the per-sample loss over ``train_set``.

    Parameters
    ----------
    model
        Influence model whose watched weights and loss define H.
    train_set
        Batched, finite dataset.
    chunk_size, memory_budget_bytes
        Of the Hessian-vector products (see :class:`ForwardOverBackwardHVP`), built on first use.
    hessian_batch_size
        Samples per accumulation step of :meth:`dense_sum` (the dataset is re-batched; None keeps its batches) on
        models with fewer than ``DENSE_BY_PRODUCTS_MIN_PARAMS`` watched weights.
    verbose
        Progress bar over the dense accumulation (None: interactive sessions only).
    """

    def __init__(self, model: BaseInfluenceModel, train_set: tf.data.Dataset, chunk_size: Optional[int] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, hessian_batch_size: Optional[int] = None,
                 verbose: Optional[bool] = None):
        super().__init__(model)
        self.train_set = train_set
        self.chunk_size = chunk_size
        self.memory_budget_bytes = memory_budget_bytes
        self.hessian_batch_size = hessian_batch_size
        self.verbose = verbose
        self._products: Optional[ForwardOverBackwardHVP] = None

    @property
    def products(self) -> "ForwardOverBackwardHVP":
        """The compiled mean Hessian-vector products (samples gathered on first use when they fit)."""
        if self._products is None:
            self._products = ForwardOverBackwardHVP(self.model, self.train_set, chunk_size=self.chunk_size,
                                                    memory_budget_bytes=self.memory_budget_bytes)
        return self._products

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.products(vectors)

    def dense_sum(self) -> Tuple[tf.Tensor, int]:
        """Sum over the dataset of the per-batch summed-loss Hessians (P, P), and the number of samples. A single
        batch's Hessian is returned as computed (model dtype); several are accumulated in float64.

        Raises
        ------
        ValueError
            If the dataset is empty.
        """
        if self.model.nb_params >= DENSE_BY_PRODUCTS_MIN_PARAMS:
            return self._dense_sum_by_products()
        dataset = self.train_set
        if self.hessian_batch_size:
            dataset = dataset.rebatch(self.hessian_batch_size)
        executor = Executor(verbose=self.verbose, memory_budget_bytes=self.memory_budget_bytes,
                            strategy=self.model.strategy)
        return executor.sum(self.model.batch_hessian_tensor, dataset, "Hessian", accumulate=tf.float64)

    def _dense_sum_by_products(self) -> Tuple[tf.Tensor, int]:
        """The dense sum as ``N · H [e_j, …, e_j+b]``: blocks of ``DENSE_COLUMN_BLOCK`` columns from the compiled
        mean Hessian-vector products, gathered in one float64 (P, P) array. On a P = 13,130 MLP over 1,497 samples
        this takes 21 s instead of 510 s (and 14.7 GiB) for the batch-wise Jacobian of the gradient."""
        products = self.products
        nb_params = self.model.nb_params
        dtype = products.kernels.dtype
        starts = range(0, nb_params, DENSE_COLUMN_BLOCK)
        total = np.empty((nb_params, nb_params), dtype=np.float64)
        for start in progress_bar(starts, len(starts), "Hessian columns", self.verbose):
            stop = min(start + DENSE_COLUMN_BLOCK, nb_params)
            unit_vectors = tf.transpose(tf.one_hot(tf.range(start, stop), nb_params, dtype=dtype))
            total[:, start:stop] = products(unit_vectors).numpy()
        total *= products.nb_samples
        return tf.constant(total), products.nb_samples


# From this many watched weights on, the dense Hessian is formed from Hessian-vector products on blocks of unit
# vectors (the batch-wise Jacobian of the gradient is slower there and holds a (B, P, P)-sized loop state).
DENSE_BY_PRODUCTS_MIN_PARAMS = 2048
DENSE_COLUMN_BLOCK = 256

# Budget of the default HVP chunk, in floats of activations (2²⁶ floats: 256 MiB in float32).
HVP_CHUNK_FLOATS = 2 ** 26


class ForwardOverBackwardHVP:
    """Mean Hessian-vector products over a dataset, without forming the Hessian.

    When the dataset fits ``memory_budget_bytes`` it is gathered in memory once and each call walks it in chunks
    inside one compiled loop; otherwise every call streams it, one batch at a time (memory of one batch). Per
    chunk, the product of the Hessian of the chunk's summed loss with each of the K vectors is one more backward
    pass through the chunk's gradient (double backward, in a loop over the K vectors); the sum over chunks is divided
    by the number of samples.

    Parameters
    ----------
    model
        Influence model whose watched weights and loss define H.
    train_dataset
        Batched, finite dataset of samples.
    weights
        Accepted for compatibility; must be ``None`` or the model's watched weights.
    chunk_size
        Samples per chunk (default: the larger of the dataset's first batch size and ``HVP_CHUNK_FLOATS / (64 ×
        input floats per sample)``, at most the dataset: the whole digits set, 1,437 samples of 64 features, is one
        chunk; 32 × 32 × 3 images give chunks of 341). Larger chunks are
        faster and use more memory for activations.
    memory_budget_bytes
        Most bytes of samples held in memory (default 4 GiB); above it, the samples are streamed.
    """

    def __init__(self, model: BaseInfluenceModel, train_dataset: tf.data.Dataset, weights: Any = None,
                 chunk_size: Optional[int] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES):
        if weights is not None and [id(w) for w in weights] != [id(w) for w in model.weights]:
            raise ValueError("weights must be the model's watched weights (model.weights).")
        assert_batched_dataset(train_dataset, "train_dataset")
        assert_known_cardinality(train_dataset, "train_dataset")
        self.model = model
        self.train_dataset = train_dataset
        self.kernels = model.kernels
        first = next(iter(compute_batches(train_dataset.take(1))), None)
        if first is None:
            raise ValueError("train_dataset is empty.")
        first_batch = int(tf.shape(tf.nest.flatten(first)[0])[0])
        self.samples = None  # streamed: each product is one pass over train_dataset
        self.nb_samples = dataset_size(train_dataset)
        self._executor = Executor(memory_budget_bytes=memory_budget_bytes, strategy=model.strategy)
        if structure_bytes(first) / first_batch * self.nb_samples <= memory_budget_bytes:
            self.samples = self._executor.gather(train_dataset)
        else:
            LOGGER.info("Hessian-vector products stream their %d samples (above memory_budget_bytes=%d).",
                        self.nb_samples, memory_budget_bytes)
        self.chunk_size = int(chunk_size) if chunk_size else max(first_batch, self._memory_chunk())

    def _memory_chunk(self) -> int:
        """Samples per chunk allowed by a memory estimate from the input size (see :func:`memory_chunk`)."""
        return memory_chunk(self.train_dataset, self.nb_samples)

    def _mean_hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        if self.samples is not None:
            return self.kernels.chunked_mean_hvp(self.samples, vectors, tf.constant(self.chunk_size))
        total, count = self._executor.sum(lambda batch: self.kernels.summed_hvp(batch, vectors), self.train_dataset)
        return total / tf.cast(count, vectors.dtype)

    def __call__(self, vectors: tf.Tensor) -> tf.Tensor:
        """Mean HVP: vectors (P,), (P, 1) or (P, K) -> (P, 1) or (P, K)."""
        vectors = tf.cast(tf.convert_to_tensor(vectors), self.kernels.dtype)
        if vectors.shape.rank == 1:
            vectors = vectors[:, None]
        return self._mean_hvp(vectors)


def memory_chunk(dataset: tf.data.Dataset, nb_samples: int) -> int:
    """Samples per chunk of products over ``dataset`` allowed by a memory estimate from the input size: activations
    taken as 64 times the floating inputs, ``HVP_CHUNK_FLOATS`` in all; within [1, ``nb_samples``]."""
    floats_per_sample = sum(int(np.prod(tensor.shape[1:])) for tensor in tf.nest.flatten(dataset.element_spec)
                            if tensor.dtype.is_floating)
    return int(min(nb_samples, max(1, HVP_CHUNK_FLOATS // (64 * max(1, floats_per_sample)))))
