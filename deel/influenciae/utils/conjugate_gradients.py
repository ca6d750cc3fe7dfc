"""Conjugate gradients for symmetric positive-definite operators, many right-hand sides at once."""
from typing import Callable, Optional, Tuple, Union

import numpy as np
import tensorflow as tf


def _identity(vectors: tf.Tensor) -> tf.Tensor:
    return vectors


def _checked_inputs(maxiter: int, preconditioner: Optional[Callable[[tf.Tensor], tf.Tensor]],
                    b: tf.Tensor) -> Tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor, bool]:
    """Validate ``maxiter`` and ``b``; return the preconditioner (identity by default), ``b`` as (P, K) and
    whether it was given as a vector."""
    if maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter}.")
    b = tf.convert_to_tensor(b)
    was_vector = b.shape.rank == 1
    if was_vector:
        b = b[:, None]
    if b.shape.rank != 2:
        raise ValueError(f"b must have shape (P,) or (P, K), got {b.shape}.")
    return (_identity if preconditioner is None else preconditioner), b, was_vector


def conjugate_gradients_solve(operator: Callable[[tf.Tensor], tf.Tensor], b: tf.Tensor, x0: Optional[tf.Tensor] = None,
                              *, maxiter: int, tol: float = 1e-3, atol: float = 1e-5,
                              M: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,  # pylint: disable=invalid-name
                              return_info: bool = False) -> Union[tf.Tensor, Tuple[tf.Tensor, dict]]:
    """Solve ``A x = b`` for every column of ``b`` with (preconditioned) conjugate gradients.

    Every column is an independent system; all columns advance together, each with its own step sizes,
    and a column stops moving once its residual satisfies ``||r||^2 <= max(tol^2 ||b||^2, atol^2)``.

    Parameters
    ----------
    operator
        Function applying the symmetric positive-definite matrix A to a (P, K) tensor, returning (P, K).
    b
        Right-hand sides, shape (P,) or (P, K).
    x0
        Starting point of the same shape as ``b`` (zeros by default).
    maxiter
        Maximum number of iterations (each applies ``operator`` once).
    tol, atol
        Relative and absolute tolerances on the residual norm.
    M
        Preconditioner approximating A^-1 (identity by default).
    return_info
        Also return ``{"iterations": int, "residual_norm": (K,) tensor}``.

    Returns
    -------
    x
        Solutions with the shape of ``b`` (and the info dictionary when ``return_info``).
    """
    preconditioner, b, was_vector = _checked_inputs(maxiter, M, b)
    x = tf.zeros_like(b) if x0 is None else tf.reshape(tf.cast(x0, b.dtype), tf.shape(b))

    def column_dot(u, v):
        return tf.reduce_sum(u * v, axis=0)

    threshold = tf.maximum(tf.cast(tol, b.dtype) ** 2 * column_dot(b, b), tf.cast(atol, b.dtype) ** 2)
    residual = b - operator(x)
    direction = preconditioner(residual)
    residual_dot = column_dot(residual, direction)

    def not_done(iteration, _x, res, _p, _rz):
        return tf.logical_and(iteration < maxiter, tf.reduce_any(column_dot(res, res) > threshold))

    def step(iteration, x, res, p, rz):
        active = column_dot(res, res) > threshold
        a_p = operator(p)
        curvature = column_dot(p, a_p)
        alpha = tf.where(tf.logical_and(active, curvature != 0), rz / tf.where(curvature != 0, curvature, 1), 0)
        x = x + alpha * p
        res = res - alpha * a_p
        z = preconditioner(res)
        rz_new = column_dot(res, z)
        beta = tf.where(tf.logical_and(active, rz != 0), rz_new / tf.where(rz != 0, rz, 1), 0)
        p = z + beta * p
        return iteration + 1, x, res, p, rz_new

    iterations, x, residual, _, _ = tf.while_loop(
        not_done, step, (tf.constant(0), x, residual, direction, residual_dot))
    if was_vector:
        x = x[:, 0]
    if return_info:
        return x, {"iterations": iterations, "residual_norm": tf.sqrt(column_dot(residual, residual))}
    return x


# Cholesky QR is used when no column is closer than this to the span of the columns before it (columns of norm
# <= 1), which keeps the triangular factor well conditioned; otherwise the rank-revealing eigendecomposition is.
_CHOLESKY_QR_MIN_PIVOT = 1e-2


def _orthonormal_basis(block: tf.Tensor, cutoff: float) -> tf.Tensor:
    """Basis (P, r) of the column span of ``block`` (P, K), orthonormal up to rounding, keeping only the
    directions whose singular value exceeds ``cutoff`` (r = 0 when none does). When the Cholesky factor of the
    (K, K) Gram matrix (formed in the block's precision) shows every column at a distance above
    ``_CHOLESKY_QR_MIN_PIVOT`` from the span of the columns before it (the usual case: a well-conditioned
    block), the basis is ``block R⁻ᵀ``
    (Cholesky QR, cheap); otherwise the Gram matrix is formed again in float64 and eigen-decomposed
    (``tf.linalg.eigh``: LAPACK through NumPy is faster on its own, but its idle threads then slow the TensorFlow
    operations of the loop down), and the directions of singular value at most ``cutoff`` are dropped.
    """
    # The Cholesky QR test tolerates the rounding of a Gram matrix in the block's precision (pivots >= 1e-2).
    gram = tf.cast(tf.matmul(block, block, transpose_a=True), tf.float64)
    factor = tf.linalg.cholesky(gram)
    pivots = tf.linalg.diag_part(factor)
    if bool(tf.reduce_all(tf.math.is_finite(factor))) and bool(tf.reduce_min(pivots) > _CHOLESKY_QR_MIN_PIVOT):
        # Q = Z R⁻ᵀ with R = factor (lower): Qᵀ Q = R⁻¹ (Zᵀ Z) R⁻ᵀ = I.
        inverse_factor = tf.linalg.triangular_solve(factor, tf.eye(tf.shape(factor)[0], dtype=tf.float64))
        return tf.matmul(block, tf.cast(inverse_factor, block.dtype), transpose_b=True)
    block64 = tf.cast(block, tf.float64)  # rank detection at the cut-off needs a float64 Gram matrix
    eigenvalues, eigenvectors = tf.linalg.eigh(tf.matmul(block64, block64, transpose_a=True))
    keep = eigenvalues > cutoff ** 2
    if not bool(tf.reduce_any(keep)):
        return block[:, :0]
    kept_vectors = tf.boolean_mask(eigenvectors, keep, axis=1) / tf.sqrt(tf.boolean_mask(eigenvalues, keep))
    return tf.matmul(block, tf.cast(kept_vectors, block.dtype))


class KrylovBasis:
    """A-orthonormal search directions kept between solves with the same operator (Krylov subspace recycling).

    Holds ``W`` (P, m) with ``Wᵀ A W = I`` and ``A W`` (P, m). A new solve starts from the Galerkin solution in
    span(W), ``x₀ = W Wᵀ b`` (no operator application), and searches only A-orthogonally to W. Directions found
    by a solve are appended until ``capacity`` columns are held, so the cost of later solves shrinks as W grows;
    once W spans the whole space a solve needs no operator application at all.

    Parameters
    ----------
    capacity
        Maximum number of stored columns (memory: ``2 · P · capacity`` numbers); 0 disables recycling.
    """

    def __init__(self, capacity: int):
        if int(capacity) < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}.")
        self.capacity = int(capacity)
        self.directions: Optional[tf.Tensor] = None
        self.products: Optional[tf.Tensor] = None

    @property
    def size(self) -> int:
        """Number of stored directions m."""
        return 0 if self.directions is None else int(self.directions.shape[1])

    def room(self) -> int:
        """How many more columns can be stored."""
        return self.capacity - self.size

    def append(self, directions: tf.Tensor, products: tf.Tensor) -> None:
        """Store A-orthonormal directions (P, r) and their images (P, r), as many as there is room for."""
        count = min(self.room(), int(directions.shape[1]))
        if count <= 0:
            return
        directions, products = directions[:, :count], products[:, :count]
        if self.directions is None:
            self.directions, self.products = directions, products
        else:
            self.directions = tf.concat([self.directions, directions], axis=1)
            self.products = tf.concat([self.products, products], axis=1)

    def clear(self) -> None:
        """Forget every stored direction."""
        self.directions = self.products = None


def _a_orthogonalize(block: tf.Tensor, directions: Optional[tf.Tensor], products: Optional[tf.Tensor]) -> tf.Tensor:
    """Remove from ``block`` its components along A-orthonormal ``directions``: ``Z − W (A W)ᵀ Z``."""
    if directions is None or int(directions.shape[1]) == 0:
        return block
    return block - tf.matmul(directions, tf.matmul(products, block, transpose_a=True))


def _a_normalized(directions: tf.Tensor, products: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """With ``DᵀAD = L Lᵀ``, the A-orthonormal block ``D L⁻ᵀ`` and its image ``(A D) L⁻ᵀ``."""
    curvature = tf.cast(tf.matmul(directions, products, transpose_a=True), tf.float64)
    factor = tf.linalg.cholesky(0.5 * (curvature + tf.transpose(curvature)))
    if not bool(tf.reduce_all(tf.math.is_finite(factor))):
        raise ValueError("The operator is not positive definite on the search directions: conjugate gradients "
                         "need a positive-definite (damped) Hessian; increase the regularization.")
    inverse_factor = tf.cast(tf.linalg.triangular_solve(factor, tf.eye(tf.shape(factor)[0], dtype=tf.float64)),
                             directions.dtype)
    return (tf.matmul(directions, inverse_factor, transpose_b=True),
            tf.matmul(products, inverse_factor, transpose_b=True))


class _BlockState:
    """Iterates and residuals of the columns still being solved; converged columns are set aside."""

    def __init__(self, b: tf.Tensor, thresholds: tf.Tensor, basis: KrylovBasis):
        self.active = np.arange(int(b.shape[1]))
        self.thresholds = thresholds
        self.residual_norms = np.zeros(len(self.active))
        self.parts: list = []
        self.columns: list = []
        self.x, self.residual = tf.zeros_like(b), b
        if basis.size:
            # Galerkin start in the kept subspace (no operator application), in two passes: the kept directions
            # are A-orthonormal only up to rounding (float32 products), and the second pass removes what the
            # first left in their span (without it, the residual stalls around 1e-5 on the digits MLP).
            for _ in range(2):
                self.step(basis.directions, basis.products)

    def retire_converged(self, force: bool) -> bool:
        """Set aside the converged columns (all of them when ``force``); whether any column is left."""
        norms = tf.norm(self.residual, axis=0)
        done = (norms <= self.thresholds).numpy() | force
        self.residual_norms[self.active] = norms.numpy()
        if done.any():
            self.parts.append(tf.boolean_mask(self.x, done, axis=1))
            self.columns.append(self.active[done])
            keep = ~done
            self.active, self.thresholds = self.active[keep], tf.boolean_mask(self.thresholds, keep)
            self.x = tf.boolean_mask(self.x, keep, axis=1)
            self.residual = tf.boolean_mask(self.residual, keep, axis=1)
        return self.active.size > 0

    def step(self, directions: tf.Tensor, products: tf.Tensor) -> None:
        """Galerkin step along A-orthonormal ``directions``: ``x += D Dᵀ r``, ``r -= (A D) Dᵀ r``."""
        coefficients = tf.matmul(directions, self.residual, transpose_a=True)
        self.x = self.x + tf.matmul(directions, coefficients)
        self.residual = self.residual - tf.matmul(products, coefficients)

    def solution(self) -> tf.Tensor:
        """Every column's iterate, in the original column order."""
        order = np.argsort(np.concatenate(self.columns))
        return tf.gather(tf.concat(self.parts, axis=1), order, axis=1)


def block_conjugate_gradients_solve(operator: Callable[[tf.Tensor], tf.Tensor], b: tf.Tensor, *, maxiter: int,
                                    tol: float = 1e-3, atol: float = 1e-5,
                                    M: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,  # pylint: disable=C0103
                                    basis: Optional[KrylovBasis] = None,
                                    return_info: bool = False) -> Union[tf.Tensor, Tuple[tf.Tensor, dict]]:
    """Solve ``A X = B`` for all columns of ``B`` together with breakdown-free block conjugate gradients.

    All columns share one growing Krylov space (block CG, made breakdown-free as in Ji & Li 2017): each
    iteration applies ``operator`` once to a block of search directions, orthonormalised with rank detection
    (dependent directions are dropped instead of breaking the iteration down) and made A-orthogonal to the
    previous block — and to every direction held in ``basis``, which also provides the starting point (Krylov
    subspace recycling, see :class:`KrylovBasis`). For K right-hand sides the Krylov space grows by up to K
    dimensions per iteration, so far fewer iterations are needed than with K independent CG solves. Converged
    columns leave the block. The loop runs eagerly (shapes change as columns converge); ``operator`` should be
    compiled.

    Parameters
    ----------
    operator
        Function applying the symmetric positive-definite matrix A to a (P, r) tensor, returning (P, r); r
        varies between calls.
    b
        Right-hand sides, shape (P,) or (P, K).
    maxiter
        Maximum number of iterations (each applies ``operator`` once, to at most K columns).
    tol, atol
        A column is converged once ``||r|| <= max(tol ||b||, atol)``.
    M
        Preconditioner approximating A⁻¹, applied to (P, r) blocks (identity by default).
    basis
        Directions kept from earlier solves with the same operator (read, then extended); ``None``: none.
    return_info
        Also return ``{"iterations": int, "residual_norm": (K,) tensor, "operator_columns": int}``
        (``operator_columns``: total number of columns passed to ``operator``).

    Returns
    -------
    x
        Solutions with the shape of ``b`` (and the info dictionary when ``return_info``).
    """
    preconditioner, b, was_vector = _checked_inputs(maxiter, M, b)
    basis = KrylovBasis(0) if basis is None else basis
    # Search blocks have unit columns before projection; what survives projection below this is rounding.
    # (sqrt(eps) for float32; 1e-7 for float64, above the rounding floor of the float64 Gram matrix.)
    cutoff = max(float(np.finfo(b.dtype.as_numpy_dtype).eps) ** 0.5, 1e-7)  # pylint: disable=no-member
    state = _BlockState(b, tf.maximum(tol * tf.norm(b, axis=0), atol), basis)
    previous: Tuple[Optional[tf.Tensor], Optional[tf.Tensor]] = (None, None)  # last block, when not in the basis
    iterations = operator_columns = 0
    exhausted = corrected = False
    while state.retire_converged(force=exhausted or iterations >= maxiter):
        search = preconditioner(state.residual)
        search = tf.math.divide_no_nan(search, tf.norm(search, axis=0, keepdims=True))
        search = _a_orthogonalize(search, *previous)
        for _ in range(2 if basis.size else 0):  # against a long basis, once is not enough in float32
            search = _a_orthogonalize(search, basis.directions, basis.products)
        directions = _orthonormal_basis(search, cutoff)
        if int(directions.shape[1]) == 0:  # nothing new to explore
            if basis.size and not corrected:
                # What is left of the residuals lies in the kept span (rounding in the A-orthogonality of the
                # kept directions): one more Galerkin pass there, then test convergence again.
                state.step(basis.directions, basis.products)
                corrected = True
            else:  # the residuals are numerically zero
                exhausted = True
            continue
        corrected = False
        directions, products = _a_normalized(directions, operator(directions))
        operator_columns += int(directions.shape[1])
        iterations += 1
        state.step(directions, products)
        stored = basis.room() >= int(directions.shape[1])
        basis.append(directions, products)
        previous = (None, None) if stored else (directions, products)
    x = state.solution()
    if was_vector:
        x = x[:, 0]
    if return_info:
        return x, {"iterations": iterations, "residual_norm": tf.constant(state.residual_norms, b.dtype),
                   "operator_columns": operator_columns}
    return x
