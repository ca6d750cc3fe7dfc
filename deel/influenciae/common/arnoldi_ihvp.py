r"""Arnoldi inverse-Hessian-vector products (Schioppa et al. 2022, "Scaling up influence functions").

The mean Hessian H (P×P) of the per-sample loss over a dataset is never formed. The Arnoldi iteration builds an
orthonormal basis ``Q = [q_0 … q_{m-1}]`` (m = ``subspace_dim`` ≤ P) of the Krylov space
``span{v, Hv, …, H^{m-1} v}`` from m mean Hessian-vector products, together with the small projected matrix
``T = Qᵀ H Q`` (m×m, upper Hessenberg; tridiagonal when H is symmetric). Eigenpairs ``T u_j = λ_j u_j`` give Ritz
pairs of H: ``H (Q u_j) ≈ λ_j (Q u_j)``. Keeping the k of **largest** magnitude, with ``G = Uᵀ Qᵀ`` (k, P) whose
rows are the Ritz vectors,

.. math::

    H ≈ Gᵀ \operatorname{diag}(λ) G, \qquad H^{-1} ≈ Gᵀ \operatorname{diag}(1 / (λ + λ_{reg})) G,

i.e. the inverse is applied on the k-dimensional dominant eigenspace and the complementary directions are dropped
(with ``k = m = P`` this is exactly ``(H + λ_{reg} I)^{-1}``).
"""
import dataclasses
import weakref
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..utils.progress import LOGGER
from .arnoldi_iteration import (_breakdown_tolerance, _finished, arnoldi_graph, arnoldi_iteration,
                                compiled_arnoldi_iteration, distill)
from .autodiff import LossKernels, compile_function
from .curvature import CurvatureOperator, HessianOperator
from .gauss_newton import CurvatureSpec, check_curvature, resolve_curvature
from .ihvp_base import InverseHessianVectorProduct, LowRankInverse, check_regularization, default_rcond
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel, assert_finite
from .solver_registry import SolverConfig, register_solver

__all__ = ["ArnoldiIHVP", "ArnoldiConfig", "arnoldi_iteration", "compiled_arnoldi_iteration", "arnoldi_graph",
           "distill"]

# The compiled Arnoldi loop of each model's kernels: one trace shared by every ArnoldiIHVP built on the model.
_ARNOLDI_LOOPS: "weakref.WeakKeyDictionary[LossKernels, Callable]" = weakref.WeakKeyDictionary()


def _check_dims(nb_params: int, subspace_dim: int, k_largest_eig_vals: int) -> None:
    for name, value in (("subspace_dim", subspace_dim), ("k_largest_eig_vals", k_largest_eig_vals)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if subspace_dim > nb_params:
        raise ValueError(f"subspace_dim={subspace_dim} exceeds the number of watched parameters P={nb_params}: the "
                         "Krylov space cannot have more dimensions than the parameter space.")
    if k_largest_eig_vals > subspace_dim:
        raise ValueError(f"k_largest_eig_vals={k_largest_eig_vals} exceeds subspace_dim={subspace_dim}: only "
                         "subspace_dim eigenvalues are computed.")


class ArnoldiIHVP(InverseHessianVectorProduct):
    r"""Inverse-Hessian-vector products on the dominant eigenspace of H found by the Arnoldi iteration.

    At construction, ``subspace_dim`` mean Hessian-vector products over ``train_dataset`` (batch-wise, compiled:
    :class:`ForwardOverBackwardHVP`) build the Krylov basis; the k Ritz pairs of largest ``|λ|`` give

    * ``apply_inverse(V) = Gᵀ diag(1 / (λ + λ_reg)) G V`` (P, K): ``(H + λ_reg I)⁻¹`` restricted to the span of the
      k Ritz vectors (exact when ``k = subspace_dim = P``). Eigenvalues with ``|λ + λ_reg|`` below
      ``rcond · max|λ + λ_reg|`` are dropped (pseudo-inverse semantics) instead of dividing by zero.
    * ``apply_hessian(V) = H V``: the exact mean Hessian-vector product (undamped).

    Parameters
    ----------
    model
        The influence model (watched weights, per-sample loss). The Hessian is taken through the full model.
    train_dataset
        Batched, finite dataset of ``(x, y)``; held in memory for the HVP passes.
    subspace_dim
        m, dimension of the Krylov space (number of HVP passes), 1 ≤ m ≤ P. Default ``min(P, 200)``.
    k_largest_eig_vals
        k, number of Ritz pairs kept, 1 ≤ k ≤ m. Default m.
    force_hermitian
        Symmetrise the projected matrix and use the symmetric eigensolver (recommended: H is symmetric).
    regularization
        λ_reg ≥ 0, added to every kept eigenvalue.
    seed
        Seed of the random start vector (and of restart vectors after a Krylov breakdown); default 0, as every
        seed of the library. ``None``: drawn from TensorFlow's global random state (``keras.utils.set_random_seed``
        makes it reproducible).
    hvp_batch_size
        Samples per chunk of the HVP passes (see :class:`ForwardOverBackwardHVP`).
    rcond
        Relative cut-off of the shifted eigenvalues; default ``10 · P · eps(model dtype)``, as :class:`ExactIHVP`.
    curvature
        Keyword only: ``"hessian"`` (or None, the default: the Hessian over ``train_dataset``), ``"gauss_newton"``
        (the Gauss–Newton matrix over ``train_dataset``,
        :class:`~deel.influenciae.common.gauss_newton.GaussNewtonOperator`) or a curvature operator.
    fit_now
        Keyword only: run the iteration now (default) or at :meth:`fit` / the first product.

    Attributes
    ----------
    eig_vals : tf.Tensor
        (k,) the kept Ritz values λ_j (without regularization), by decreasing magnitude, in the model's dtype.
    G : tf.Tensor
        (k, P) the kept Ritz vectors as rows, in the model's dtype.
    inverse_eig_vals : tf.Tensor
        (k,) ``1 / (λ_j + λ_reg)`` (0 for dropped eigenvalues).
    restarts : int
        Krylov breakdowns met (each one restarted the iteration in the orthogonal complement).
    memory_budget_bytes : int
        Class attribute (default 4 GiB): the samples are held in memory for the Hessian-vector products only below
        it; above it every product streams them (the Python Arnoldi loop is used then).
    """

    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __init__(self, model: BaseInfluenceModel, train_dataset: tf.data.Dataset, subspace_dim: Optional[int] = None,
                 k_largest_eig_vals: Optional[int] = None, force_hermitian: bool = True, regularization: float = 0.0,
                 seed: Optional[int] = 0, hvp_batch_size: Optional[int] = None, rcond: Optional[float] = None,
                 dtype: Optional[tf.DType] = None, *, curvature: CurvatureSpec = None,
                 fit_now: bool = True):
        super().__init__(model, train_dataset)
        curvature = check_curvature(curvature)
        if train_dataset is None and not isinstance(curvature, CurvatureOperator):
            raise ValueError("ArnoldiIHVP needs a train_dataset (or a curvature operator).")
        nb_params = model.nb_params
        subspace_dim = min(nb_params, 200) if subspace_dim is None else subspace_dim
        k_largest_eig_vals = subspace_dim if k_largest_eig_vals is None else k_largest_eig_vals
        _check_dims(nb_params, subspace_dim, k_largest_eig_vals)
        regularization = check_regularization(regularization)
        self.subspace_dim = int(subspace_dim)
        self.k_largest_eig_vals = int(k_largest_eig_vals)
        self.force_hermitian = bool(force_hermitian)
        self.regularization = regularization
        self.seed = seed
        self.rcond = float(default_rcond(nb_params, model.dtype) if rcond is None else rcond)  # as ExactIHVP
        self.dtype = tf.as_dtype(dtype) if dtype is not None else model.dtype
        self.curvature = resolve_curvature(curvature, model, train_dataset, chunk_size=hvp_batch_size,
                                           memory_budget_bytes=self.memory_budget_bytes) or HessianOperator(
            model, train_dataset, chunk_size=hvp_batch_size, memory_budget_bytes=self.memory_budget_bytes)
        self.restarts = 0
        self.eig_vals = self.G = self.inverse_eig_vals = None  # set by the fit
        if fit_now:
            self.fit()

    def _fit(self) -> None:
        """Run the Arnoldi iteration and keep the k dominant Ritz pairs."""
        eig_vals, projections = self.arnoldi(self.model.nb_params)
        self._set_eigenpairs(eig_vals, projections)

    @property
    def hessian_vector_product(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """The curvature operator's products (the compiled Hessian-vector products for a Hessian)."""
        return getattr(self.curvature, "products", self.curvature.matvec)

    def _rng(self) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(int(tf.random.uniform([], maxval=2 ** 62, dtype=tf.int64)))

    def _compiled_arnoldi(self) -> Callable:
        """The compiled Arnoldi loop of this model's kernels: one trace shared by every ArnoldiIHVP built on the
        model, whatever its data, subspace dimension or tolerance."""
        kernels = self.model.kernels
        if kernels not in _ARNOLDI_LOOPS:
            _ARNOLDI_LOOPS[kernels] = compile_function(
                lambda samples, chunk_size, first, size, tolerance: arnoldi_graph(
                    lambda vectors: kernels.chunked_mean_hvp_eager(samples, vectors, chunk_size), first, size,
                    tolerance, kernels.dtype))
        return _ARNOLDI_LOOPS[kernels]

    def _numpy_hvp(self, vector: np.ndarray) -> np.ndarray:
        return self.hessian_vector_product(tf.constant(vector[:, None])).numpy()[:, 0]

    def arnoldi(self, dim: int) -> Tuple[np.ndarray, np.ndarray]:
        """Run the Arnoldi iteration from a random start vector and distill the k dominant Ritz pairs.

        Parameters
        ----------
        dim
            Dimension of the start vector: the number of watched parameters P.

        Returns
        -------
        eig_vals, G
            float64 arrays (k,) and (k, P) (see :func:`distill`).
        """
        if dim != self.model.nb_params:
            raise ValueError(f"dim must be the number of watched parameters ({self.model.nb_params}), got {dim}.")
        rng = self._rng()
        start = rng.standard_normal(dim)
        tolerance = _breakdown_tolerance(self.model.dtype)
        compiled = None
        if getattr(self.hessian_vector_product, "samples", None) is not None:  # held in memory: one compiled loop
            compiled = _finished(*self._compiled_arnoldi()(self.hessian_vector_product.samples,
                                                            tf.constant(self.hessian_vector_product.chunk_size),
                                                            tf.constant(start), tf.constant(self.subspace_dim),
                                                            tf.constant(tolerance, tf.float64)))
        if compiled is not None:
            basis, projected = compiled
            self.restarts = 0
        else:  # streamed samples, or a Krylov breakdown: the Python loop (restarts in the orthogonal complement)
            basis, projected, self.restarts = arnoldi_iteration(self._numpy_hvp, start, self.subspace_dim, rng,
                                                                tolerance)
        LOGGER.info("Arnoldi: %d Krylov vectors built (%d restarts), keeping the %d largest Ritz values",
                    self.subspace_dim, self.restarts, self.k_largest_eig_vals)
        return distill(projected, basis, self.k_largest_eig_vals, self.force_hermitian)

    def _redamp(self) -> None:
        """Re-damp the kept Ritz pairs: ``1 / (λ_j + λ')`` (no Hessian-vector product)."""
        if self._fitted:
            self._set_eigenpairs(self.eig_vals.numpy().astype(np.float64), self.G.numpy())

    def _set_eigenpairs(self, eig_vals: np.ndarray, projections: np.ndarray) -> None:
        shifted = eig_vals + self.regularization
        cutoff = self.rcond * np.max(np.abs(shifted))
        keep = np.abs(shifted) > cutoff
        inverse = np.where(keep, 1.0 / np.where(keep, shifted, 1.0), 0.0)
        self.eig_vals = tf.constant(eig_vals, self.dtype)
        self.G = tf.constant(projections, self.dtype)
        self.inverse_eig_vals = tf.constant(inverse, self.dtype)
        assert_finite(self.G, "Arnoldi Ritz vectors")

    def low_rank(self) -> LowRankInverse:
        """``(G, 1/(λ + λ_reg), λ)``: the inverse is ``Gᵀ diag(1/(λ + λ_reg)) G``."""
        self.fit()
        return LowRankInverse(self.G, self.inverse_eig_vals, self.eig_vals)

    def project(self, vectors: tf.Tensor) -> tf.Tensor:
        """Coordinates on the Ritz vectors, ``V G ᵀ``: rows (B, P) -> (B, k)."""
        return self.low_rank().project(vectors)

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``Gᵀ diag(1/(λ + λ_reg)) G V``: (P, K) -> (P, K)."""
        self.fit()
        coordinates = tf.matmul(self.G, tf.cast(vectors, self.dtype)) * self.inverse_eig_vals[:, None]
        return tf.cast(tf.matmul(self.G, coordinates, transpose_a=True), self.model.dtype)

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        """Exact mean Hessian-vector products ``H V``: (P, K) -> (P, K)."""
        return self.curvature.matvec(tf.cast(vectors, self.model.dtype))


@dataclasses.dataclass(frozen=True)
class ArnoldiConfig(SolverConfig):
    """Settings of :class:`ArnoldiIHVP` (see its parameters)."""

    subspace_dim: Optional[int] = None
    k_largest_eig_vals: Optional[int] = None
    force_hermitian: bool = True
    seed: Optional[int] = 0
    hvp_batch_size: Optional[int] = None
    rcond: Optional[float] = None
    curvature: CurvatureSpec = "hessian"


register_solver("arnoldi", ArnoldiIHVP, ArnoldiConfig,
                description="the inverse on the k dominant Ritz pairs of H found by the Arnoldi iteration")
