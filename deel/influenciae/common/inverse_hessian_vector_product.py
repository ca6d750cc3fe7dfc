"""Inverse-Hessian-vector products (IHVPs): the ``H⁻¹ v`` at the heart of influence functions.

``H`` is the **mean** Hessian of the per-sample loss over a "hessian dataset", with respect to the watched
weights of an :class:`~deel.influenciae.common.InfluenceModel`. With ``regularization = λ`` every solver
inverts the damped matrix ``H + λ I`` instead (``λ = 0`` keeps the reference behaviour: a pseudo-inverse for
the exact solver). Vectors are laid out as columns: a batch of B vectors is a (P, B) tensor.

* :class:`ExactIHVP`: builds H (P×P, batch by batch), factorises it once (symmetric eigendecomposition in
  float64) and reuses the factorisation for every vector. O(P²) memory, O(P³) time: P up to ~10k.
* :class:`ConjugateGradientDescentIHVP`: conjugate gradients on mean Hessian-vector products, no P×P matrix.
* :class:`LissaIHVP`: the LiSSA fixed-point iteration on mean Hessian-vector products.
"""
import warnings
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from ..utils.conjugate_gradients import KrylovBasis, block_conjugate_gradients_solve, conjugate_gradients_solve
from ..utils.linear_algebra import (blocked_cholesky_solve, blocked_triangular_solve, damped_cholesky, symmetric_eigh,
                                    symmetric_eigvalsh)
from ..utils.model_split import NotSplittableError, split_model_shared
from ..utils.tf_operations import assert_batched_dataset, assert_known_cardinality, compute_batches, dataset_size
from ..utils.progress import LOGGER, progress_bar
from .autodiff import compile_function
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_wrappers import BaseInfluenceModel, InfluenceModel, non_finite_error


class InverseHessianVectorProduct(ABC):
    """Base class of the IHVP solvers.

    Parameters
    ----------
    model
        The influence model (watched weights, loss).
    train_dataset
        Batched dataset of ``(x, y)`` over which the mean Hessian is taken (optional for solvers that receive
        the Hessian otherwise).
    """

    def __init__(self, model: BaseInfluenceModel, train_dataset: Optional[tf.data.Dataset]):
        if not isinstance(model, BaseInfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        self.model = model
        self.train_set = train_dataset
        self.cardinality = None
        if train_dataset is not None:
            assert_batched_dataset(train_dataset, "train_dataset")
            self.cardinality = assert_known_cardinality(train_dataset, "train_dataset")

    # Hooks ---------------------------------------------------------------------------------------
    @abstractmethod
    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """Return ``(H + λI)⁻¹ V`` for vectors given as columns: (P, K) -> (P, K)."""

    @abstractmethod
    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        """Return ``H V`` (mean Hessian, undamped) for vectors given as columns: (P, K) -> (P, K)."""

    def inverse_quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (H + λI)⁻¹ v`` for every column of (P, K) vectors: (K,)."""
        vectors = tf.cast(vectors, self.model.dtype)
        return tf.reduce_sum(vectors * tf.cast(self.apply_inverse(vectors), vectors.dtype), axis=0)

    # Generic API ----------------------------------------------------------------------------------
    def _vectors_of(self, group_batch: Tuple, use_gradient: bool) -> tf.Tensor:
        """(B, P) vectors of a batch: per-sample gradients, or the batch's first element itself."""
        if use_gradient:
            return self.model.batch_jacobian_tensor(group_batch)
        vectors = group_batch[0] if isinstance(group_batch, (tuple, list)) else group_batch
        return tf.cast(vectors, self.model.dtype)

    def _compute_ihvp_single_batch(self, group_batch: Tuple, use_gradient: bool = True) -> tf.Tensor:
        """``(H + λI)⁻¹ Gᵀ`` for one batch: (P, B) (one column per sample)."""
        return self.apply_inverse(tf.transpose(self._vectors_of(group_batch, use_gradient)))

    def _compute_hvp_single_batch(self, group_batch: Tuple, use_gradient: bool = True) -> tf.Tensor:
        """``H Gᵀ`` for one batch: (P, B)."""
        return self.apply_hessian(tf.transpose(self._vectors_of(group_batch, use_gradient)))

    def compute_ihvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """Inverse-Hessian-vector products of every batch of ``group``.

        Parameters
        ----------
        group
            Batched dataset of ``(x, y)`` samples (``use_gradient=True``: their per-sample gradients are used) or
            of ``(v,)`` tuples of (B, P) vectors (``use_gradient=False``).

        Returns
        -------
        tf.data.Dataset
            One (P, B) tensor per batch.
        """
        assert_batched_dataset(group, "group")
        return group.map(lambda *batch: self._compute_ihvp_single_batch(batch, use_gradient))

    def compute_hvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """Hessian-vector products of every batch of ``group``: one (P, B) tensor per batch."""
        assert_batched_dataset(group, "group")
        return group.map(lambda *batch: self._compute_hvp_single_batch(batch, use_gradient))


def estimate_exact_hessian_bytes(nb_params: int, dtype: tf.DType = tf.float32, several_batches: bool = False) -> int:
    """Peak bytes held while :class:`ExactIHVP` builds and factorises a P×P Hessian, counting every temporary.

    In units of P² elements (s: bytes of ``dtype``; t: bytes of the accumulation, 8 when several batches are summed in
    float64, s otherwise), the stages are:

    * accumulation: the batch's Jacobian loop (its array of rows and the stacked result, 2s) plus, with several
      batches, the float64 sum, the cast batch and the new sum (24);
    * symmetrisation: the sum, its transpose, the mean and the damped mean (4t) and the mean in ``dtype`` (s);
    * Cholesky (λ > 0): the kept mean (t + s), the damped matrix (t), its float64 and ``dtype`` copies and factors
      (8 + 8 + 2s);
    * the eigendecomposition (λ = 0, or the fallback when ``H + λI`` is not positive definite): the kept mean
      (t + s), the float64 matrix, NumPy's copy, LAPACK's matrix and workspace (8 + 8 + 8 + 16), the eigenvectors
      returned to TensorFlow (8), the scaled product and the inverse (8 + 8), and the inverse in ``dtype`` (s).

    The largest stage is returned: since a Cholesky that fails falls back to the eigendecomposition, that is the
    eigendecomposition stage for every realistic ``dtype``.
    """
    size = tf.as_dtype(dtype).size
    accumulated = 8 if several_batches else size
    stages = [2 * size + (24 if several_batches else 0),
              4 * accumulated + size,
              accumulated + size + accumulated + 16 + 2 * size,
              accumulated + size + 8 + 8 + 8 + 16 + 8 + 8 + 8 + size]
    return int(nb_params) ** 2 * max(stages)


# Compiled once for the module (not per solver): traces are shared by every ExactIHVP with the same P and dtype.
_compiled_cholesky_solve = compile_function(blocked_cholesky_solve)
_compiled_triangular_solve = compile_function(blocked_triangular_solve)


@tf.function(reduce_retracing=True, autograph=False)
def _symmetrized_mean(total: tf.Tensor, count: tf.Tensor, regularization: tf.Tensor,
                      dtype: tf.DType) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """From a (P, P) sum T: the mean ``H = (T + Tᵀ) / (2 count)`` and ``H + λI`` in the precision of T, H in
    ``dtype``, and whether H is finite."""
    mean = (total + tf.transpose(total)) * tf.cast(0.5 / count, total.dtype)
    damped = tf.linalg.set_diag(mean, tf.linalg.diag_part(mean) + tf.cast(regularization, total.dtype))
    return mean, damped, tf.cast(mean, dtype), tf.reduce_all(tf.math.is_finite(mean))


class ExactIHVP(InverseHessianVectorProduct):
    """Exact inverse-Hessian-vector products from the full mean Hessian.

    The Hessian is accumulated batch by batch as the Jacobian of the gradient of each batch's summed loss
    (one P×P matrix per batch, summed in float64 when there are several), divided by the number of samples and
    symmetrised. With ``λ > 0`` and ``H + λI`` positive definite, ``H + λI = L Lᵀ`` (Cholesky), factorised in the
    model's dtype when its estimated condition number allows it (condition × machine epsilon <=
    ``FACTOR_ACCURACY`` = 1e-5) and in float64 otherwise, and vectors are solved with the triangular factor (two
    blocked triangular solves in the model's dtype, ``O(P² K)`` for K vectors); the explicit inverse is only
    formed when ``inv_hessian`` is read. Otherwise, in float64, ``H = Q diag(e) Qᵀ`` and the solver applies
    ``Q diag(f(e + λ)) Qᵀ`` with ``f(s) = 1/s``, except that eigenvalues with ``|s| <= rcond · max|s|`` are dropped
    (``f(s) = 0``): with ``λ = 0`` this is the Moore–Penrose pseudo-inverse, as in the reference.

    Parameters
    ----------
    model
        The influence model.
    train_dataset
        Batched dataset over which the mean Hessian is computed.
    train_hessian
        A precomputed (P, P) mean Hessian, used instead of ``train_dataset``.
    regularization
        λ ≥ 0: solve with ``H + λ I``.
    memory_budget_bytes
        Refuse (``MemoryError``-free ``ValueError``) when the peak of the P×P matrices and their temporaries
        (:func:`estimate_exact_hessian_bytes`, also kept as ``memory_estimate_bytes``) would exceed this.
    rcond
        Relative cut-off for small eigenvalues; default ``10 · P · eps`` of the model's dtype (numpy/TF pinv).
    hessian_batch_size
        Samples per Hessian accumulation step (the dataset is re-batched); ``None`` keeps its batches. Larger
        steps are faster (fewer passes of P backward products); memory grows with the batch's activations only.

    Attributes
    ----------
    hessian : tf.Tensor
        (P, P) mean Hessian (undamped), model dtype.
    inv_hessian : tf.Tensor
        (P, P) matrix applied to vectors: ``(H + λI)⁻¹`` (pseudo-inverse when λ = 0), model dtype (formed on
        first access when a Cholesky factor is used).
    cholesky_factor : tf.Tensor or None
        (P, P) lower-triangular L with ``L Lᵀ = H + λI`` in the model dtype, or None (spectral inverse).
    factor_dtype : tf.DType or None
        Precision in which L was computed (the model's dtype or float64), None without a Cholesky factor.
    eigenvalues : tf.Tensor
        (P,) eigenvalues of the mean Hessian, float64, ascending (computed lazily).
    memory_estimate_bytes : int
        The peak memory estimate checked against ``memory_budget_bytes``.
    verbose : bool or None
        Class attribute: progress bar over the Hessian's batches (None: in interactive sessions only).
    """

    verbose: Optional[bool] = None

    def __init__(self, model: BaseInfluenceModel, train_dataset: Optional[tf.data.Dataset] = None,
                 train_hessian: Optional[Union[tf.Tensor, np.ndarray]] = None, regularization: float = 0.0,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, rcond: Optional[float] = None,
                 hessian_batch_size: Optional[int] = 4096):
        super().__init__(model, train_dataset)
        self.hessian_batch_size = hessian_batch_size
        if train_dataset is None and train_hessian is None:
            raise ValueError("ExactIHVP needs either train_dataset (to compute the Hessian) or train_hessian.")
        regularization = float(regularization)
        if regularization < 0 or not np.isfinite(regularization):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
        self.regularization = regularization
        nb_params = model.nb_params
        if train_hessian is not None:
            several_batches = True
        elif hessian_batch_size:
            several_batches = dataset_size(train_dataset) > int(hessian_batch_size)
        else:
            several_batches = self.cardinality != 1
        needed = estimate_exact_hessian_bytes(nb_params, model.dtype, several_batches)
        self.memory_estimate_bytes = needed
        if needed > memory_budget_bytes:
            raise ValueError(
                f"ExactIHVP would need about {needed / 1024 ** 3:.2f} GiB for the {nb_params}x{nb_params} Hessian, "
                f"above memory_budget_bytes={memory_budget_bytes} ({memory_budget_bytes / 1024 ** 3:.2f} GiB). "
                "Use ConjugateGradientDescentIHVP ('cgd'), LissaIHVP ('lissa') or Arnoldi, watch fewer weights, "
                "or raise memory_budget_bytes.")
        if train_hessian is not None:
            total, count = tf.cast(tf.convert_to_tensor(train_hessian), tf.float64), 1
            if tuple(total.shape) != (nb_params, nb_params):
                raise ValueError(f"train_hessian must have shape ({nb_params}, {nb_params}), got "
                                 f"{tuple(total.shape)}.")
        else:
            total, count = self._summed_hessian(train_dataset)
        mean, damped, self.hessian, finite = _symmetrized_mean(
            total, tf.constant(count, tf.float64), tf.constant(regularization, tf.float64), model.dtype)
        if not bool(finite):
            raise non_finite_error("Hessian")
        if rcond is None:
            rcond = 10.0 * nb_params * float(np.finfo(model.dtype.as_numpy_dtype).eps)  # pylint: disable=no-member
        self.rcond = float(rcond)
        self._mean_hessian = mean  # in the precision of the accumulation
        self._eigenvalues = None
        factor = damped_cholesky(damped, model.dtype) if regularization > 0 else None
        self.cholesky_factor = None if factor is None else tf.cast(factor, model.dtype)
        self.factor_dtype = None if factor is None else factor.dtype
        self._factor = factor
        self._inverse = None if factor is not None else \
            tf.cast(self._spectral_inverse(tf.cast(mean, tf.float64), regularization), model.dtype)

    @property
    def inv_hessian(self) -> tf.Tensor:
        """(P, P) ``(H + λI)⁻¹`` (pseudo-inverse semantics when λ = 0), model dtype; formed on first access."""
        if self._inverse is None:
            factor64 = tf.cast(self._factor, tf.float64)
            identity = tf.eye(tf.shape(factor64)[0], dtype=tf.float64)
            self._inverse = tf.cast(tf.linalg.cholesky_solve(factor64, identity), self.hessian.dtype)
        return self._inverse

    def _spectral_inverse(self, hessian64: tf.Tensor, regularization: float) -> tf.Tensor:
        """``Q diag(f(e + λ)) Qᵀ`` with small shifted eigenvalues dropped (pseudo-inverse semantics)."""
        eigenvalues, eigenvectors = symmetric_eigh(hessian64)
        self._eigenvalues = eigenvalues
        shifted = eigenvalues + regularization
        cutoff = self.rcond * tf.reduce_max(tf.abs(shifted))
        keep = tf.abs(shifted) > cutoff
        inverse_spectrum = tf.where(keep, 1.0 / tf.where(keep, shifted, 1.0), 0.0)
        return tf.matmul(eigenvectors * inverse_spectrum[None, :], eigenvectors, transpose_b=True)

    @property
    def eigenvalues(self) -> tf.Tensor:
        """(P,) eigenvalues of the mean Hessian (undamped), float64, ascending (computed on first access)."""
        if self._eigenvalues is None:
            self._eigenvalues = symmetric_eigvalsh(tf.cast(self._mean_hessian, tf.float64))
        return self._eigenvalues

    def _summed_hessian(self, dataset: tf.data.Dataset) -> Tuple[tf.Tensor, int]:
        """Sum over the dataset of the per-batch summed-loss Hessians (P, P), and the number of samples. A single
        batch's Hessian is returned as computed (model dtype); several are accumulated in float64."""
        total = None
        count = 0
        if self.hessian_batch_size:
            dataset = dataset.rebatch(self.hessian_batch_size)
        count_batches = int(tf.data.experimental.cardinality(dataset))
        for batch in progress_bar(compute_batches(dataset), count_batches if count_batches >= 0 else None,
                                  "Hessian", self.verbose):
            batch_hessian = self.model.batch_hessian_tensor(batch)
            total = batch_hessian if total is None else tf.cast(total, tf.float64) + tf.cast(batch_hessian, tf.float64)
            count += int(tf.shape(tf.nest.flatten(batch)[0])[0])
        if count == 0:
            raise ValueError("train_dataset is empty.")
        return total, count

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = tf.cast(vectors, self.hessian.dtype)
        if self._inverse is None:
            return _compiled_cholesky_solve(self.cholesky_factor, vectors)
        return tf.matmul(self._inverse, vectors)

    def inverse_quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (H + λI)⁻¹ v`` for every column: (P, K) -> (K,). With a Cholesky factor this is ``||L⁻¹ v||²``,
        one triangular solve instead of two."""
        vectors = tf.cast(vectors, self.hessian.dtype)
        if self._inverse is None:
            whitened = _compiled_triangular_solve(self.cholesky_factor, vectors)
            return tf.reduce_sum(tf.square(whitened), axis=0)
        return super().inverse_quadratic_form(vectors)

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.hessian, tf.cast(vectors, self.hessian.dtype))


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
        if structure_bytes(first) / first_batch * self.nb_samples <= memory_budget_bytes:
            batches = [tuple(batch) for batch in compute_batches(train_dataset)]
            self.samples = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)
        else:
            LOGGER.info("Hessian-vector products stream their %d samples (above memory_budget_bytes=%d).",
                        self.nb_samples, memory_budget_bytes)
        self.chunk_size = int(chunk_size) if chunk_size else max(first_batch, self._memory_chunk())

    def _memory_chunk(self) -> int:
        """Samples per chunk allowed by a memory estimate from the input size (activations taken as 64 times the
        inputs), within [1, N]."""
        spec = self.train_dataset.element_spec
        floats_per_sample = sum(int(np.prod(tensor.shape[1:])) for tensor in tf.nest.flatten(spec)
                                if tensor.dtype.is_floating)
        return int(min(self.nb_samples, max(1, HVP_CHUNK_FLOATS // (64 * max(1, floats_per_sample)))))

    def _mean_hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        if self.samples is not None:
            return self.kernels.chunked_mean_hvp(self.samples, vectors, tf.constant(self.chunk_size))
        total = tf.zeros_like(vectors)
        for batch in compute_batches(self.train_dataset):
            total += self.kernels.summed_hvp(tuple(batch), vectors)
        return total / tf.cast(self.nb_samples, vectors.dtype)

    def __call__(self, vectors: tf.Tensor) -> tf.Tensor:
        """Mean HVP: vectors (P,), (P, 1) or (P, K) -> (P, 1) or (P, K)."""
        vectors = tf.cast(tf.convert_to_tensor(vectors), self.kernels.dtype)
        if vectors.shape.rank == 1:
            vectors = vectors[:, None]
        return self._mean_hvp(vectors)


class _HeadModel(BaseInfluenceModel):
    """The part of a model above a cut, watching the same weights, fed with precomputed features."""

    def __init__(self, head: keras.Model, weights: Any, loss_function: Any):
        # Features are stored as (features, targets, sample_weight) triples whatever the user's batch layout.
        super().__init__(head, weights, loss_function, _feature_batch, weights_processed=True)


def _feature_batch(batch: Tuple) -> Tuple[Any, Any, Any]:
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def _split_for_hvp(model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]]
                   ) -> Tuple[Optional[keras.Model], "_HeadModel"]:
    """``(feature extractor or None, head influence model)`` for a cut at ``extractor_layer``.

    Cached on the influence model, so that every solver built on it shares the head and its compiled kernels
    (building a second solver traces nothing).
    """
    cache = model.kernels.compiled_cache.setdefault("hvp_split", {})
    if extractor_layer not in cache:
        extractor, head = None, model.model
        if extractor_layer is not None:
            try:
                extractor, head = split_model_shared(model.model, extractor_layer)
            except NotSplittableError as error:
                # Correct without a cut, only slower: every Hessian-vector product runs the whole model.
                warnings.warn(f"The model cannot be cut at extractor_layer={extractor_layer!r} ({error}); "
                              "Hessian-vector products will run the whole model on the raw inputs.",
                              RuntimeWarning, stacklevel=4)
        head_ids = {id(variable) for variable in head.variables}
        outside = [variable.path for variable in model.weights if id(variable) not in head_ids]
        if outside:
            raise ValueError(f"Watched weights {outside} lie below extractor_layer={extractor_layer!r}; the head "
                             "must contain every watched weight (pick an earlier extractor_layer).")
        cache[extractor_layer] = (extractor, _HeadModel(head, model.weights, model.loss_function))
    return cache[extractor_layer]


class IterativeIHVP(InverseHessianVectorProduct):
    """Base of the solvers that only need Hessian-vector products (CG, LiSSA).

    The model is cut in two at ``extractor_layer``: the layers below it (which must hold no watched weight)
    are evaluated once per training sample and their outputs cached in memory; every Hessian-vector product
    then only runs the head. All vectors of a batch are solved together.

    Parameters
    ----------
    model
        The influence model.
    extractor_layer
        Index or name (in ``model.model.layers``) of the first layer of the head. Defaults to the first
        watched layer (``model.start_layer_index``), or to the whole model for a :class:`BaseInfluenceModel`.
    train_dataset
        Batched dataset over which the mean Hessian is taken.
    n_opt_iters
        Iterations of the solver.
    feature_extractor
        Optional Keras model computing the head's input from ``x`` (used instead of the automatic split).
    regularization
        λ ≥ 0: solve with ``H + λ I``.
    hvp_batch_size
        Batch size of the cached features for the HVP passes (default: the dataset's first batch size).

    Attributes
    ----------
    memory_budget_bytes : int
        Class attribute (default 4 GiB): the cached head inputs are held in memory only below it; above it they are
        recomputed and streamed on every pass of Hessian-vector products (memory of one batch).
    weights : list
        The watched weights (``model.weights``), as in the reference.
    """

    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]],
                 train_dataset: tf.data.Dataset, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, regularization: float = 0.0,
                 hvp_batch_size: Optional[int] = None):
        super().__init__(model, train_dataset)
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset.")
        if int(n_opt_iters) < 1:
            raise ValueError(f"n_opt_iters must be >= 1, got {n_opt_iters}.")
        regularization = float(regularization)
        if regularization < 0 or not np.isfinite(regularization):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
        self.n_opt_iters = int(n_opt_iters)
        self.regularization = regularization
        self.weights = model.weights
        if extractor_layer is None:
            extractor_layer = getattr(model, "start_layer_index", None)
        self.extractor_layer = extractor_layer
        extractor, self.head_model = _split_for_hvp(model, extractor_layer)
        if feature_extractor is not None:
            extractor = feature_extractor
        self.feature_extractor = extractor
        self.feature_dataset = self._cache_features(train_dataset, hvp_batch_size)
        self.hessian_vector_product = ForwardOverBackwardHVP(self.head_model, self.feature_dataset,
                                                             chunk_size=hvp_batch_size,
                                                             memory_budget_bytes=self.memory_budget_bytes)
        self._solve = compile_function(self._solve_eager)

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        """Solver-specific ``(H + λI)⁻¹ V`` (compiled in __init__)."""
        raise NotImplementedError

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        return self._solve(tf.cast(vectors, self.model.dtype))

    def _features_of(self, batch: Tuple) -> Tuple:
        inputs, targets, sample_weight = self.model.process_batch_for_loss_fn(batch)
        features = inputs if self.feature_extractor is None else self.feature_extractor(inputs, training=False)
        return (features, targets) if sample_weight is None else (features, targets, sample_weight)

    def _cache_features(self, dataset: tf.data.Dataset, hvp_batch_size: Optional[int]) -> tf.data.Dataset:
        """The head's inputs: held in memory when they fit ``memory_budget_bytes``, else computed per pass."""
        first = next(iter(compute_batches(dataset.take(1))), None)
        if first is None:
            raise ValueError("train_dataset is empty.")
        first_features = self._features_of(tuple(first))
        self._batch_shape = tf.shape(tf.nest.flatten(first_features[0])[0])
        first_size = int(tf.shape(tf.nest.flatten(first_features[1])[0])[0])
        if structure_bytes(first_features) / first_size * dataset_size(dataset) > self.memory_budget_bytes:
            LOGGER.info("The head's inputs of %s are computed on every pass (above memory_budget_bytes=%d).",
                        type(self).__name__, self.memory_budget_bytes)
            return dataset.map(lambda *batch: self._features_of(batch))
        parts = [self._features_of(tuple(batch)) for batch in compute_batches(dataset)]
        stacked = tuple(tf.nest.map_structure(lambda *tensors: tf.concat(tensors, axis=0), *column)
                        for column in zip(*parts))
        return tf.data.Dataset.from_tensor_slices(stacked).batch(hvp_batch_size or first_size)

    def batch_shape_tensor(self) -> tf.Tensor:
        """Shape of the first batch of cached features."""
        return self._batch_shape

    def damped_hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI) V`` for (P, K) vectors."""
        product = self.hessian_vector_product(vectors)
        if self.regularization:
            product = product + self.regularization * vectors
        return product

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.hessian_vector_product(tf.cast(vectors, self.model.dtype))


class ConjugateGradientDescentIHVP(IterativeIHVP):
    """Inverse-Hessian-vector products by conjugate gradients on mean Hessian-vector products.

    Solves ``(H + λI) x = v`` for all the vectors of a batch at once; each iteration is one pass of
    Hessian-vector products over the cached features. H must be positive definite on the vectors' span for
    CG to converge: use ``regularization > 0`` for non-convex models.

    By default the K vectors of a batch are solved by *block* CG (all columns share one Krylov space, which
    grows by up to K directions per iteration), which needs several times fewer iterations — and Hessian-vector
    products — than K independent CG solves for the same residual; ``block=False`` runs the independent
    column-wise iteration of the reference. With ``recycle_directions > 0`` the search directions of earlier
    solves are kept (up to that many columns of P numbers, twice) and reused by later ones (Krylov subspace
    recycling): solves after the first start from the solution in the kept subspace and only search outside
    it, so a series of batches costs far fewer Hessian-vector products in total. The kept directions are
    A-orthonormal only up to rounding, so the start is computed in two Galerkin passes and a residual left in
    the kept span gets one more pass; in float32 the residuals then stay within about 1.5x ``tol`` (digits MLP,
    P = 2,410, ``tol`` = 1e-6, measured against a float64 Hessian).

    Parameters
    ----------
    model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization, hvp_batch_size
        See :class:`IterativeIHVP`.
    tol, atol
        Stop a column when ``||r|| <= max(tol ||v||, atol)``.
    block
        Block CG over all the vectors of a call (default) instead of independent column-wise CG.
    recycle_directions
        Number of search directions kept between calls (block CG only); 0 disables recycling.
    """

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]] = None,
                 train_dataset: Optional[tf.data.Dataset] = None, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, regularization: float = 0.0,
                 hvp_batch_size: Optional[int] = None, tol: float = 1e-3, atol: float = 1e-5, block: bool = True,
                 recycle_directions: int = 0):
        super().__init__(model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization,
                         hvp_batch_size)
        self.tol = float(tol)
        self.atol = float(atol)
        self.block = bool(block)
        if int(recycle_directions) < 0:
            raise ValueError(f"recycle_directions must be >= 0, got {recycle_directions}.")
        if recycle_directions and not self.block:
            raise ValueError("recycle_directions needs block=True.")
        self.krylov_basis = KrylovBasis(int(recycle_directions))
        self.last_solve_info: Optional[dict] = None

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        return conjugate_gradients_solve(self.damped_hvp, vectors, maxiter=self.n_opt_iters, tol=self.tol,
                                         atol=self.atol)

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI)⁻¹ V`` for (P, K) vectors: (P, K). Details of the last block solve (iterations, number of
        Hessian-vector products, residual norms) are kept in ``last_solve_info``. Block CG runs eagerly; inside a
        graph (``tf.function``, ``Dataset.map``) it runs through ``tf.py_function``."""
        vectors = tf.cast(vectors, self.model.dtype)
        if not self.block:
            return super().apply_inverse(vectors)
        if tf.executing_eagerly():
            return self._block_solve(vectors)
        solution = tf.py_function(self._block_solve, [vectors], Tout=self.model.dtype)
        solution.set_shape(vectors.shape)
        return solution

    def _block_solve(self, vectors: tf.Tensor) -> tf.Tensor:
        solution, self.last_solve_info = block_conjugate_gradients_solve(
            self.damped_hvp, vectors, maxiter=self.n_opt_iters, tol=self.tol, atol=self.atol,
            basis=self.krylov_basis, return_info=True)
        info = self.last_solve_info
        LOGGER.info("Block CG: %d vectors, %d iterations, %s Hessian-vector products, largest residual %.3e",
                    int(vectors.shape[1]), int(info["iterations"]), info.get("operator_columns", "?"),
                    float(tf.reduce_max(info["residual_norm"])) if int(vectors.shape[1]) else 0.0)
        return solution


ConjugateGradientIHVP = ConjugateGradientDescentIHVP


class LissaIHVP(IterativeIHVP):
    """Inverse-Hessian-vector products by the LiSSA iteration (Agarwal et al. 2017).

    Starting from ``x₀ = v`` it repeats ``x ← v + (1 − d)·x − (H + λI)·x / s`` ``n_opt_iters`` times and returns
    ``x / s``. Its fixed point is ``(H + λI + d·s·I)⁻¹ v``; it converges when the eigenvalues of
    ``(H + λI)/s + d`` lie in (0, 2), i.e. ``s`` must exceed the largest eigenvalue of ``H + λI`` and H must be
    positive semi-definite. The error after n iterations decays like ``(1 − d − μ/s)ⁿ`` with μ the smallest
    eigenvalue of ``H + λI``.

    Parameters
    ----------
    model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization, hvp_batch_size
        See :class:`IterativeIHVP`.
    damping
        d, in [0, 1).
    scale
        s > 0.

    Raises
    ------
    ValueError
        From ``apply_inverse`` (and so every IHVP), when the iteration diverges: its iterates become non-finite or
        their steps grow (they never grow when it converges, since each step is the previous one times a matrix
        of norm < 1). The message gives the largest eigenvalue of ``H + λI`` found by power iteration and a
        ``scale`` above it (or a ``regularization`` when H has negative eigenvalues). Inside a graph (e.g.
        ``compute_ihvp``'s ``Dataset.map``) an assertion fails instead.
    """

    GROWTH_LIMIT = 2.0  # divergence: the last step is longer than GROWTH_LIMIT times the first one

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]] = None,
                 train_dataset: Optional[tf.data.Dataset] = None, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, damping: float = 1e-4, scale: float = 10.,
                 regularization: float = 0.0, hvp_batch_size: Optional[int] = None):
        if not 0 <= damping < 1:
            raise ValueError(f"damping must be in [0, 1), got {damping}.")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        super().__init__(model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization,
                         hvp_batch_size)
        self.damping = float(damping)
        self.scale = float(scale)
        self._solve_checked = compile_function(self._iterate)

    def _iterate(self, vectors: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """The LiSSA iterates for (P, K) vectors: ``x / s`` (P, K), and whether the iteration stayed finite and its
        steps did not grow (a scalar bool)."""
        def step(iteration, estimate, first_step, _):
            updated = vectors + (1.0 - self.damping) * estimate - self.damped_hvp(estimate) / self.scale
            length = tf.norm(updated - estimate, axis=0)
            return iteration + 1, updated, tf.where(iteration == 0, length, first_step), length

        lengths = tf.zeros(tf.shape(vectors)[1:], vectors.dtype)
        _, estimate, first_step, last_step = tf.while_loop(lambda iteration, *_: iteration < self.n_opt_iters, step,
                                                           (tf.constant(0), vectors, lengths, lengths))
        stable = tf.logical_and(tf.reduce_all(tf.math.is_finite(estimate)),
                                tf.reduce_all(last_step <= self.GROWTH_LIMIT * first_step))
        return estimate / self.scale, stable

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        return self._iterate(vectors)[0]

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI + d·s·I)⁻¹ V`` for (P, K) vectors: (P, K).

        Raises
        ------
        ValueError
            If the iteration diverges (see the class docstring).
        """
        solution, stable = self._solve_checked(tf.cast(vectors, self.model.dtype))
        if tf.executing_eagerly():
            if not bool(stable):
                raise self._divergence_error()
            return solution
        message = (f"LiSSA diverged: scale={self.scale} must exceed the largest eigenvalue of H + λI (and H + λI "
                   "must be positive semi-definite); call apply_inverse eagerly for a suggested value.")
        with tf.control_dependencies([tf.debugging.Assert(stable, [message])]):
            return tf.identity(solution)

    def _extreme_eigenvalue(self, shift: float = 0.0, iterations: int = 30) -> float:
        """Eigenvalue of ``H + λI - shift·I`` of largest magnitude, by power iteration from a seeded vector."""
        vector = tf.random.stateless_normal((self.model.nb_params, 1), seed=(0, 0), dtype=self.model.dtype)
        value = 0.0
        for _ in range(iterations):
            vector = vector / tf.norm(vector)
            product = self.damped_hvp(vector) - shift * vector
            value = float(tf.reduce_sum(vector * product))
            vector = product
        return value

    def _divergence_error(self) -> ValueError:
        """The error of a diverging iteration, with the eigenvalues that explain it and a suggested setting."""
        largest = self._extreme_eigenvalue()
        lowest = largest + self._extreme_eigenvalue(shift=largest) if largest > 0 else largest
        if lowest < -1e-6 * max(abs(largest), 1e-12):
            return ValueError(
                f"LiSSA diverged: H + λI has a negative eigenvalue (about {lowest:.3g} by power iteration, "
                f"regularization={self.regularization}) and LiSSA needs a positive semi-definite matrix. Raise "
                f"regularization above {-lowest:.2g} (e.g. regularization={self.regularization - 2 * lowest:.2g}) "
                f"and keep scale above the largest eigenvalue (about {largest - 2 * lowest:.3g} then), or use "
                "ExactIHVP / ConjugateGradientDescentIHVP with regularization.")
        return ValueError(
            f"LiSSA diverged (non-finite or growing iterates): scale={self.scale} must exceed the largest eigenvalue "
            f"of H + λI, about {largest:.3g} by power iteration (regularization={self.regularization}). Use a larger "
            f"scale, e.g. scale={float(f'{2 * largest:.2g}'):g}.")


class IHVPCalculator(Enum):
    """The IHVP solvers selectable by name: ``'exact'``, ``'cgd'`` and ``'lissa'``."""

    Exact = ExactIHVP
    Cgd = ConjugateGradientDescentIHVP
    Lissa = LissaIHVP

    @staticmethod
    def from_string(ihvp_calculator: str) -> "IHVPCalculator":
        """Map ``'exact' | 'cgd' | 'lissa'`` (case-insensitive) to a member."""
        names = {"exact": IHVPCalculator.Exact, "cgd": IHVPCalculator.Cgd, "lissa": IHVPCalculator.Lissa}
        if not isinstance(ihvp_calculator, str) or ihvp_calculator.lower() not in names:
            raise ValueError(f"ihvp_calculator must be one of {sorted(names)}, got {ihvp_calculator!r}.")
        return names[ihvp_calculator.lower()]


def build_ihvp(ihvp_calculator: Any, model: InfluenceModel, dataset: tf.data.Dataset,
               regularization: float = 0.0) -> InverseHessianVectorProduct:
    """Resolve a solver given by name, enum member, class or instance into an instance.

    Names and classes are built on ``dataset`` with default settings and the given ``regularization``;
    instances are returned as they are.
    """
    if isinstance(ihvp_calculator, InverseHessianVectorProduct):
        return ihvp_calculator
    if isinstance(ihvp_calculator, str):
        ihvp_calculator = IHVPCalculator.from_string(ihvp_calculator)
    if isinstance(ihvp_calculator, IHVPCalculator):
        ihvp_calculator = ihvp_calculator.value
    if isinstance(ihvp_calculator, type) and issubclass(ihvp_calculator, InverseHessianVectorProduct):
        if issubclass(ihvp_calculator, IterativeIHVP):
            return ihvp_calculator(model, None, dataset, regularization=regularization)
        return ihvp_calculator(model, dataset, regularization=regularization)
    raise TypeError("ihvp_calculator must be 'exact', 'cgd', 'lissa', an IHVPCalculator member, an "
                    f"InverseHessianVectorProduct subclass or instance; got {ihvp_calculator!r}.")
