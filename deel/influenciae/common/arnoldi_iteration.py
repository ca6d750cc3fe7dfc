"""The Arnoldi iteration (float64, full reorthogonalisation) and the distillation of its Ritz pairs: the linear
algebra under :class:`~deel.influenciae.common.ArnoldiIHVP`."""
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from .autodiff import compile_function


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
