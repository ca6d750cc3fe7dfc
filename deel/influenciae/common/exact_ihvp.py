"""Exact inverse-Hessian-vector products: the full mean Hessian, factorised once and reused for every vector."""
import dataclasses
from typing import Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from ..utils.linear_algebra import (LUFactor, blocked_cholesky_solve, blocked_triangular_solve, damped_cholesky,
                                    symmetric_eigh, symmetric_eigvalsh)
from ..utils.tf_operations import dataset_size
from .autodiff import compile_function
from .curvature import CurvatureOperator, HessianOperator
from .gauss_newton import CurvatureSpec, check_curvature, resolve_curvature
from .ihvp_base import InverseHessianVectorProduct, check_regularization, default_rcond
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel, non_finite_error
from .solver_registry import SolverConfig, register_solver


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
    (one P×P matrix per batch, summed in float64 when there are several) or, from 2,048 watched weights on, from
    Hessian-vector products on blocks of unit vectors (:class:`HessianOperator`), divided by the number of samples
    and symmetrised. With ``λ > 0`` and ``H + λI`` positive definite, ``H + λI = L Lᵀ`` (Cholesky), factorised in the
    model's dtype when its estimated condition number allows it (condition × machine epsilon <=
    ``FACTOR_ACCURACY`` = 1e-5) and in float64 otherwise, and vectors are solved with the triangular factor (two
    blocked triangular solves in the model's dtype, ``O(P² K)`` for K vectors); the explicit inverse is only
    formed when ``inv_hessian`` is read. With ``λ > 0`` and ``H + λI`` indefinite (non-convex models), an LU
    factorisation in float64 (:class:`~deel.influenciae.utils.linear_algebra.LUFactor`) solves with the true inverse,
    unless its pivots say the matrix is numerically singular (smallest/largest pivot <= ``rcond``). Otherwise, in
    float64, ``H = Q diag(e) Qᵀ`` and the solver applies
    ``Q diag(f(e + λ)) Qᵀ`` with ``f(s) = 1/s``, except that eigenvalues are dropped (``f(s) = 0``) when
    ``|s| <= rcond · max|s|`` with ``λ = 0`` (the Moore–Penrose pseudo-inverse, as in the reference), or, with
    ``λ > 0``, when ``|s|`` is within the Hessian's rounding (``|s| <= 10 · eps(dtype) · max|e|``): the damped
    directions are inverted, as by the LU factorisation.

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
    curvature
        Keyword only: the curvature whose dense matrix is inverted: ``"hessian"`` (or None, the default: the Hessian
        over ``train_dataset``, :class:`~deel.influenciae.common.HessianOperator`), ``"gauss_newton"`` (the
        Gauss–Newton matrix over ``train_dataset``, :class:`~deel.influenciae.common.gauss_newton.GaussNewtonOperator`:
        positive semi-definite for losses convex in the outputs, so a Cholesky factor for every λ > 0), or a
        :class:`~deel.influenciae.common.CurvatureOperator`.
    fit_now
        Keyword only: build and factorise the matrix now (default); with False, :meth:`fit` (or the first
        product) does it.

    Attributes
    ----------
    hessian : tf.Tensor
        (P, P) mean Hessian (undamped), model dtype: the mean of the chosen ``curvature`` (e.g. the Gauss–Newton
        matrix).
    inv_hessian : tf.Tensor
        (P, P) matrix applied to vectors: ``(H + λI)⁻¹`` (pseudo-inverse when λ = 0), model dtype (formed on
        first access when a Cholesky factor is used).
    lu_factor : LUFactor or None
        The LU factorisation of an indefinite ``H + λI``, or None.
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
                 hessian_batch_size: Optional[int] = 4096, *, curvature: CurvatureSpec = None,
                 fit_now: bool = True):
        super().__init__(model, train_dataset)
        self.hessian_batch_size = hessian_batch_size
        curvature = check_curvature(curvature)
        if train_dataset is None and train_hessian is None and not isinstance(curvature, CurvatureOperator):
            raise ValueError("ExactIHVP needs either train_dataset (to compute the Hessian) or train_hessian (or "
                             "curvature, a curvature operator).")
        self.regularization = check_regularization(regularization)
        nb_params = model.nb_params
        if train_hessian is not None or train_dataset is None:
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
        self._train_hessian = None
        if train_hessian is not None:
            self._train_hessian = tf.cast(tf.convert_to_tensor(train_hessian), tf.float64)
            if tuple(self._train_hessian.shape) != (nb_params, nb_params):
                raise ValueError(f"train_hessian must have shape ({nb_params}, {nb_params}), got "
                                 f"{tuple(self._train_hessian.shape)}.")
        operator = curvature if isinstance(curvature, CurvatureOperator) else None
        if operator is None and train_dataset is not None:
            operator = resolve_curvature(curvature, model, train_dataset, memory_budget_bytes=memory_budget_bytes,
                                         verbose=self.verbose)
        if operator is None and train_dataset is not None:
            operator = HessianOperator(model, train_dataset, memory_budget_bytes=memory_budget_bytes,
                                       hessian_batch_size=hessian_batch_size, verbose=self.verbose)
        self.curvature = operator
        self.rcond = float(default_rcond(nb_params, model.dtype) if rcond is None else rcond)
        # Set by the fit.
        self.hessian = self.cholesky_factor = self.factor_dtype = self.lu_factor = self._inverse_spectrum = None
        self._spectrum: dict = {}
        self._mean_hessian = self._eigenvalues = self._factor = self._inverse = None
        if fit_now:
            self.fit()

    def _fit(self) -> None:
        """Build the mean Hessian and factorise ``H + λI`` (Cholesky, or the eigendecomposition)."""
        if self._train_hessian is not None:
            total, count = self._train_hessian, 1
        else:
            total, count = self.curvature.dense_sum()
        mean, damped, self.hessian, finite = _symmetrized_mean(
            total, tf.constant(count, tf.float64), tf.constant(self.regularization, tf.float64), self.model.dtype)
        if not bool(finite):
            raise non_finite_error("Hessian")
        self._mean_hessian = mean  # in the precision of the accumulation
        self._eigenvalues = None
        self._spectrum = {}  # shared with the copies of with_regularization (same H)
        self._factorise(damped)

    def _redamp(self) -> None:
        """Refactorise ``H + λ'I`` from the kept mean Hessian (no pass over the data); an eigendecomposition done by
        this solver or a re-damped relative is reused, not recomputed."""
        if self._fitted:
            mean = self._mean_hessian
            self._factorise(tf.linalg.set_diag(mean, tf.linalg.diag_part(mean)
                                               + tf.constant(self.regularization, mean.dtype)))

    def _factorise(self, damped: tf.Tensor) -> None:
        """Cholesky factor of ``H + λI`` (λ > 0, positive definite); else LU (λ > 0, indefinite, unless an
        eigendecomposition is already at hand); else the spectral (pseudo-)inverse."""
        known_indefinite = "eigh" in self._spectrum and self._spectrum["eigh"][0][0] + self.regularization <= 0
        factor = damped_cholesky(damped, self.model.dtype) if self.regularization > 0 and not known_indefinite \
            else None
        self.cholesky_factor = None if factor is None else tf.cast(factor, self.model.dtype)
        self.factor_dtype = None if factor is None else factor.dtype
        self._factor = factor
        self._inverse = self.lu_factor = self._inverse_spectrum = None
        if factor is not None:
            return
        if self.regularization > 0 and "eigh" not in self._spectrum:
            lu_factor = LUFactor(tf.cast(damped, tf.float64))
            if lu_factor.pivot_ratio > self.rcond:
                self.lu_factor = lu_factor
                return
        eigenvalues, _ = self._eigenpairs()
        shifted = eigenvalues + self.regularization
        if self.regularization > 0:  # only the exactly singular directions: the same inverse as LU's
            eps = float(np.finfo(self.model.dtype.as_numpy_dtype).eps)  # pylint: disable=no-member
            keep = np.abs(shifted) > 10.0 * eps * np.max(np.abs(eigenvalues))
        else:
            keep = np.abs(shifted) > self.rcond * np.max(np.abs(shifted))
        self._inverse_spectrum = tf.constant(np.where(keep, 1.0 / np.where(keep, shifted, 1.0), 0.0))

    def _eigenpairs(self) -> Tuple[np.ndarray, tf.Tensor]:
        """``(e (P,) ascending, Q (P, P))`` of the mean Hessian in float64, computed once and shared with the solvers
        re-damped from this one."""
        if "eigh" not in self._spectrum:
            eigenvalues, eigenvectors = symmetric_eigh(tf.cast(self._mean_hessian, tf.float64))
            self._spectrum["eigh"] = (eigenvalues.numpy(), eigenvectors)
        eigenvalues, eigenvectors = self._spectrum["eigh"]
        self._eigenvalues = tf.constant(eigenvalues)
        return eigenvalues, eigenvectors

    @property
    def inv_hessian(self) -> tf.Tensor:
        """(P, P) ``(H + λI)⁻¹`` (pseudo-inverse semantics when λ = 0), model dtype; formed on first access."""
        self.fit()
        if self._inverse is None:
            if self._inverse_spectrum is not None:
                eigenvectors = self._spectrum["eigh"][1]
                inverse = tf.matmul(eigenvectors * self._inverse_spectrum[None, :], eigenvectors, transpose_b=True)
            elif self.lu_factor is not None:
                inverse = self.lu_factor.solve(tf.eye(self.model.nb_params, dtype=tf.float64))
            else:
                factor64 = tf.cast(self._factor, tf.float64)
                inverse = tf.linalg.cholesky_solve(factor64, tf.eye(tf.shape(factor64)[0], dtype=tf.float64))
            self._inverse = tf.cast(inverse, self.hessian.dtype)
        return self._inverse

    @property
    def eigenvalues(self) -> tf.Tensor:
        """(P,) eigenvalues of the mean Hessian (undamped), float64, ascending (computed on first access)."""
        self.fit()
        if self._eigenvalues is None:
            self._eigenvalues = symmetric_eigvalsh(tf.cast(self._mean_hessian, tf.float64))
        return self._eigenvalues

    def _summed_hessian(self, dataset: tf.data.Dataset) -> Tuple[tf.Tensor, int]:
        """Sum of the per-batch summed-loss Hessians over ``dataset`` (P, P) and the number of samples (see
        :meth:`HessianOperator.dense_sum`)."""
        return HessianOperator(self.model, dataset, hessian_batch_size=self.hessian_batch_size,
                               verbose=self.verbose).dense_sum()

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        self.fit()
        vectors = tf.cast(vectors, self.hessian.dtype)
        if self._inverse is not None:
            return tf.matmul(self._inverse, vectors)
        if self.cholesky_factor is not None:
            return _compiled_cholesky_solve(self.cholesky_factor, vectors)
        if self.lu_factor is not None:
            return tf.cast(self.lu_factor.solve(vectors), vectors.dtype)
        eigenvectors = self._spectrum["eigh"][1]  # Q (s ⊙ Qᵀ V): 4 P² K operations, no P×P inverse formed
        coordinates = tf.matmul(eigenvectors, tf.cast(vectors, tf.float64), transpose_a=True)
        return tf.cast(tf.matmul(eigenvectors, self._inverse_spectrum[:, None] * coordinates), vectors.dtype)

    def inverse_quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (H + λI)⁻¹ v`` for every column: (P, K) -> (K,). With a Cholesky factor this is ``||L⁻¹ v||²``,
        one triangular solve instead of two."""
        self.fit()
        vectors = tf.cast(vectors, self.hessian.dtype)
        if self._inverse is None and self.cholesky_factor is not None:
            whitened = _compiled_triangular_solve(self.cholesky_factor, vectors)
            return tf.reduce_sum(tf.square(whitened), axis=0)
        return super().inverse_quadratic_form(vectors)

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        self.fit()
        return tf.matmul(self.hessian, tf.cast(vectors, self.hessian.dtype))


@dataclasses.dataclass(frozen=True)
class ExactConfig(SolverConfig):
    """Settings of :class:`ExactIHVP` (see its parameters)."""

    rcond: Optional[float] = None
    hessian_batch_size: Optional[int] = 4096
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    curvature: CurvatureSpec = "hessian"


register_solver("exact", ExactIHVP, ExactConfig,
                description="the full mean Hessian, factorised once (Cholesky or eigendecomposition); P up to ~10k")
