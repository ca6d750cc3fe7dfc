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
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..utils.progress import LOGGER
from .autodiff import compile_function
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .inverse_hessian_vector_product import ForwardOverBackwardHVP, InverseHessianVectorProduct
from .model_wrappers import BaseInfluenceModel, assert_finite


def _breakdown_tolerance(operator_dtype: tf.DType) -> float:
    """Relative size below which a residual is numerical noise of an HVP computed in ``operator_dtype``."""
    return 100.0 * float(np.finfo(operator_dtype.as_numpy_dtype).eps)  # pylint: disable=no-member


def _orthogonalize(vector: np.ndarray, basis: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Classical Gram–Schmidt applied twice ("CGS2") against the orthonormal rows of ``basis``.

    Returns the orthogonalised vector (P,) and the total coefficients ``basis · vector`` (r,).
    """
    coefficients = np.zeros(basis.shape[0])
    for _ in range(2):
        step = basis @ vector
        vector = vector - basis.T @ step
        coefficients += step
    return vector, coefficients


def arnoldi_iteration(hvp: Callable[[np.ndarray], np.ndarray], start: np.ndarray, subspace_dim: int,
                      rng: np.random.Generator, breakdown_tolerance: float = 1e-10
                      ) -> Tuple[np.ndarray, np.ndarray, int]:
    r"""Arnoldi iteration with full (double) Gram–Schmidt reorthogonalisation, in float64.

    For i = 0 … m−1: ``w = H q_i``; ``w`` is orthogonalised twice against ``q_0 … q_i`` (the coefficients fill
    column i of T); if ``i + 1 < m`` the next basis vector is ``q_{i+1} = w / ||w||`` with ``T[i+1, i] = ||w||``.

    Krylov breakdown (``||w|| <= breakdown_tolerance · ||H q_i||``: the basis spans an invariant subspace) does not
    divide by zero: ``T[i+1, i] = 0`` and the iteration restarts from a fresh random vector orthogonal to the basis,
    so T stays block upper-Hessenberg, ``Qᵀ H Q = T`` still holds, and m basis vectors are always produced.

    Parameters
    ----------
    hvp
        The operator: a (P,) float64 array to ``H v`` (P,).
    start
        Start vector v (P,), non-zero.
    subspace_dim
        m, 1 ≤ m ≤ P.
    rng
        Source of the restart vectors.
    breakdown_tolerance
        Relative residual norm that counts as a breakdown.

    Returns
    -------
    basis, projected, restarts
        ``basis`` (m, P) orthonormal rows ``q_i``; ``projected`` (m, m) ``T = Q H Qᵀ`` in the row layout
        (``T[j, i] = q_jᵀ H q_i``); ``restarts`` the number of breakdowns met.
    """
    start = np.asarray(start, np.float64).ravel()
    nb_params = start.size
    if not 1 <= subspace_dim <= nb_params:
        raise ValueError(f"subspace_dim must be in [1, {nb_params}], got {subspace_dim}.")
    norm = np.linalg.norm(start)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("The start vector must be finite and non-zero.")
    basis = np.zeros((subspace_dim, nb_params))
    projected = np.zeros((subspace_dim, subspace_dim))
    basis[0] = start / norm
    restarts = 0
    for i in range(subspace_dim):
        product = np.asarray(hvp(basis[i]), np.float64).ravel()
        if not np.all(np.isfinite(product)):
            raise ValueError("Non-finite Hessian-vector product in the Arnoldi iteration; check the model, the "
                             "inputs and the loss.")
        product_norm = np.linalg.norm(product)
        residual, coefficients = _orthogonalize(product, basis[:i + 1])
        projected[:i + 1, i] = coefficients
        if i + 1 == subspace_dim:
            break
        residual_norm = np.linalg.norm(residual)
        if residual_norm > breakdown_tolerance * max(product_norm, np.finfo(np.float64).tiny):
            projected[i + 1, i] = residual_norm
            basis[i + 1] = residual / residual_norm
            continue
        # Breakdown: span(q_0..q_i) is invariant under H. Continue in its orthogonal complement.
        restarts += 1
        for _ in range(10):
            fresh, _ = _orthogonalize(rng.standard_normal(nb_params), basis[:i + 1])
            fresh_norm = np.linalg.norm(fresh)
            if fresh_norm > 1e-8 * np.sqrt(nb_params):
                break
        else:  # pragma: no cover - i + 1 < P, so a random vector has a component outside the basis
            raise RuntimeError("Could not draw a restart vector for the Arnoldi iteration.")
        basis[i + 1] = fresh / fresh_norm
    return basis, projected, restarts


def compiled_arnoldi_iteration(hvp: Callable[[tf.Tensor], tf.Tensor], start: np.ndarray, subspace_dim: int,
                               breakdown_tolerance: float = 1e-10, dtype: tf.DType = tf.float32
                               ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    r"""The loop of :func:`arnoldi_iteration` compiled as one TensorFlow graph (float64 Gram–Schmidt, twice).

    Much faster when each Hessian-vector product is cheap (no Python round trip per step). It does not restart
    after a Krylov breakdown: it returns ``None`` instead, and the caller falls back to :func:`arnoldi_iteration`.

    Parameters
    ----------
    hvp
        Graph-compatible operator: a (P, 1) tensor in the model's dtype to ``H v`` (P, 1).
    start, subspace_dim, breakdown_tolerance
        As in :func:`arnoldi_iteration` (``start`` must be finite and non-zero).
    dtype
        The dtype ``hvp`` takes and returns.

    Returns
    -------
    basis, projected
        float64 arrays (m, P) and (m, m) as in :func:`arnoldi_iteration`, or ``None`` after a breakdown.
    """
    start = tf.constant(np.asarray(start, np.float64).ravel())
    run = compile_function(lambda first, size, tolerance: arnoldi_graph(hvp, first, size, tolerance, dtype))
    return _finished(*run(start, tf.constant(subspace_dim), tf.constant(breakdown_tolerance, tf.float64)))


def _finished(basis: tf.Tensor, projected: tf.Tensor, broken: tf.Tensor) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    return None if bool(broken) else (basis.numpy(), projected.numpy())


def arnoldi_graph(hvp: Callable[[tf.Tensor], tf.Tensor], first: tf.Tensor, subspace_dim: tf.Tensor,
                  breakdown_tolerance: tf.Tensor, dtype: tf.DType) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Graph code of :func:`compiled_arnoldi_iteration`: ``(basis (m, P), projected (m, m), broken)`` in float64;
    ``subspace_dim`` and ``breakdown_tolerance`` are tensors, so one trace serves every size."""
    nb_params = tf.shape(first)[0]
    basis = tf.tensor_scatter_nd_update(tf.zeros(tf.stack([subspace_dim, nb_params]), tf.float64), [[0]],
                                        [first / tf.norm(first)])
    columns = tf.zeros(tf.stack([subspace_dim, subspace_dim]), tf.float64)  # row i holds column i of T

    def body(i, basis, columns, broken):
        product = tf.cast(hvp(tf.cast(basis[i], dtype)[:, None])[:, 0], tf.float64)
        product_norm = tf.norm(product)
        residual, coefficients = product, tf.zeros(tf.stack([subspace_dim]), tf.float64)
        for _ in range(2):  # rows of the basis beyond i are zero, so they add nothing
            step = tf.linalg.matvec(basis, residual)
            residual -= tf.linalg.matvec(basis, step, transpose_a=True)
            coefficients += step
        residual_norm = tf.norm(residual)
        last = i + 1 >= subspace_dim
        healthy = residual_norm > breakdown_tolerance * tf.maximum(product_norm, np.finfo(np.float64).tiny)
        subdiagonal = tf.one_hot(tf.minimum(i + 1, subspace_dim - 1), subspace_dim, dtype=tf.float64)
        coefficients += tf.where(last, tf.zeros_like(residual_norm), residual_norm) * subdiagonal
        columns = tf.tensor_scatter_nd_update(columns, [[i]], [coefficients])
        next_row = tf.where(tf.logical_or(last, tf.logical_not(healthy)), tf.zeros_like(residual),
                            residual / tf.maximum(residual_norm, np.finfo(np.float64).tiny))
        basis = tf.tensor_scatter_nd_update(basis, [[tf.minimum(i + 1, subspace_dim - 1)]],
                                            [tf.where(last, basis[subspace_dim - 1], next_row)])
        broken = tf.logical_or(broken, tf.logical_and(tf.logical_not(last), tf.logical_not(healthy)))
        return i + 1, basis, columns, broken

    _, basis, columns, broken = tf.while_loop(
        lambda i, _b, _c, broken: tf.logical_and(i < subspace_dim, tf.logical_not(broken)), body,
        (tf.constant(0), basis, columns, tf.constant(False)))
    return basis, tf.transpose(columns), broken


def distill(projected: np.ndarray, basis: np.ndarray, k: int, force_hermitian: bool) -> Tuple[np.ndarray, np.ndarray]:
    r"""Ritz pairs of largest magnitude from the Arnoldi outputs, in float64.

    With ``T = U diag(λ) U⁻¹`` (m×m), keep the k eigenvalues of largest ``|λ|`` and return ``G = U_kᵀ Q`` (k, P),
    the rows being the corresponding Ritz vectors in parameter space.

    * ``force_hermitian=True``: T is symmetrised, ``(T + Tᵀ)/2`` (for a symmetric H, T is tridiagonal up to
      rounding), and solved with the symmetric eigensolver: real λ, orthonormal U, orthonormal rows of G.
    * ``force_hermitian=False``: the general eigensolver on T as it is. H being symmetric, its eigenpairs are real
      up to rounding; the real parts are kept (the eigenvectors are re-normalised) so that everything stays real.

    Parameters
    ----------
    projected
        T (m, m).
    basis
        Q as rows (m, P).
    k
        Number of eigenpairs to keep, 1 ≤ k ≤ m.
    force_hermitian
        Use the symmetric eigensolver.

    Returns
    -------
    eig_vals, G
        ``eig_vals`` (k,) sorted by decreasing ``|λ|``; ``G`` (k, P).
    """
    size = projected.shape[0]
    if not 1 <= k <= size:
        raise ValueError(f"k_largest_eig_vals must be in [1, subspace_dim={size}], got {k}.")
    if force_hermitian:
        eig_vals, eig_vecs = np.linalg.eigh(0.5 * (projected + projected.T))
    else:
        eig_vals, eig_vecs = np.linalg.eig(projected)
    order = np.argsort(-np.abs(eig_vals), kind="stable")[:k]
    eig_vals, eig_vecs = np.real(eig_vals[order]), np.real(eig_vecs[:, order])
    if not force_hermitian:
        norms = np.linalg.norm(eig_vecs, axis=0)
        eig_vecs = eig_vecs / np.where(norms > 0, norms, 1.0)[None, :]
    return eig_vals, eig_vecs.T @ basis


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
        Seed of the random start vector (and of restart vectors after a Krylov breakdown). ``None``: drawn from
        TensorFlow's global random state (``keras.utils.set_random_seed`` makes it reproducible).
    hvp_batch_size
        Samples per chunk of the HVP passes (see :class:`ForwardOverBackwardHVP`).
    rcond
        Relative cut-off of the shifted eigenvalues; default ``10 · P · eps(model dtype)``, as :class:`ExactIHVP`.

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
                 seed: Optional[int] = None, hvp_batch_size: Optional[int] = None, rcond: Optional[float] = None,
                 dtype: Optional[tf.DType] = None):
        super().__init__(model, train_dataset)
        if train_dataset is None:
            raise ValueError("ArnoldiIHVP needs a train_dataset.")
        nb_params = model.nb_params
        subspace_dim = min(nb_params, 200) if subspace_dim is None else subspace_dim
        k_largest_eig_vals = subspace_dim if k_largest_eig_vals is None else k_largest_eig_vals
        _check_dims(nb_params, subspace_dim, k_largest_eig_vals)
        regularization = float(regularization)
        if regularization < 0 or not np.isfinite(regularization):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
        self.subspace_dim = int(subspace_dim)
        self.k_largest_eig_vals = int(k_largest_eig_vals)
        self.force_hermitian = bool(force_hermitian)
        self.regularization = regularization
        self.seed = seed
        if rcond is None:
            # Same default as ExactIHVP.
            rcond = 10.0 * nb_params * float(np.finfo(model.dtype.as_numpy_dtype).eps)  # pylint: disable=no-member
        self.rcond = float(rcond)
        self.dtype = tf.as_dtype(dtype) if dtype is not None else model.dtype
        self.hessian_vector_product = ForwardOverBackwardHVP(model, train_dataset, chunk_size=hvp_batch_size,
                                                             memory_budget_bytes=self.memory_budget_bytes)
        self.restarts = 0
        eig_vals, projections = self.arnoldi(nb_params)
        self._set_eigenpairs(eig_vals, projections)

    def _rng(self) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(int(tf.random.uniform([], maxval=2 ** 62, dtype=tf.int64)))

    def _compiled_arnoldi(self) -> Callable:
        """The compiled Arnoldi loop of this model's kernels: one trace shared by every ArnoldiIHVP built on the
        model, whatever its data, subspace dimension or tolerance."""
        kernels = self.model.kernels
        cache = kernels.compiled_cache
        if "arnoldi_loop" not in cache:
            cache["arnoldi_loop"] = compile_function(
                lambda samples, chunk_size, first, size, tolerance: arnoldi_graph(
                    lambda vectors: kernels.chunked_mean_hvp_eager(samples, vectors, chunk_size), first, size,
                    tolerance, kernels.dtype))
        return cache["arnoldi_loop"]

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
        if self.hessian_vector_product.samples is not None:  # held in memory: one compiled loop
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

    def _set_eigenpairs(self, eig_vals: np.ndarray, projections: np.ndarray) -> None:
        shifted = eig_vals + self.regularization
        cutoff = self.rcond * np.max(np.abs(shifted))
        keep = np.abs(shifted) > cutoff
        inverse = np.where(keep, 1.0 / np.where(keep, shifted, 1.0), 0.0)
        self.eig_vals = tf.constant(eig_vals, self.dtype)
        self.G = tf.constant(projections, self.dtype)
        self.inverse_eig_vals = tf.constant(inverse, self.dtype)
        assert_finite(self.G, "Arnoldi Ritz vectors")

    def project(self, vectors: tf.Tensor) -> tf.Tensor:
        """Coordinates on the Ritz vectors, ``V G ᵀ``: rows (B, P) -> (B, k)."""
        return tf.matmul(tf.cast(vectors, self.dtype), self.G, transpose_b=True)

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``Gᵀ diag(1/(λ + λ_reg)) G V``: (P, K) -> (P, K)."""
        coordinates = tf.matmul(self.G, tf.cast(vectors, self.dtype)) * self.inverse_eig_vals[:, None]
        return tf.cast(tf.matmul(self.G, coordinates, transpose_a=True), self.model.dtype)

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        """Exact mean Hessian-vector products ``H V``: (P, K) -> (P, K)."""
        return self.hessian_vector_product(tf.cast(vectors, self.model.dtype))
