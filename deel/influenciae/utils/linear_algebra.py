"""Dense linear algebra helpers: triangular solves and Cholesky factorisations whose work is done by matrix
products, a Cholesky factorisation in the lowest precision the matrix's conditioning allows, and symmetric
eigendecompositions through LAPACK."""
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

DEFAULT_TRIANGULAR_BLOCK = 256


def blocked_triangular_solve(lower: tf.Tensor, rhs: tf.Tensor, adjoint: bool = False,
                             block_size: int = DEFAULT_TRIANGULAR_BLOCK) -> tf.Tensor:
    """Solve ``L X = B`` (or ``Lᵀ X = B`` with ``adjoint``) for a lower-triangular ``L``, by recursive halving.

    ``L = [[L11, 0], [L21, L22]]``: ``X1 = L11⁻¹ B1`` then ``X2 = L22⁻¹ (B2 - L21 X1)`` (with ``adjoint``, the
    mirror order with ``L21ᵀ``), down to diagonal blocks of at most ``block_size`` rows solved by
    ``tf.linalg.triangular_solve``. Nearly all the ``P² K`` operations become matrix products, which run
    several times faster on CPU than TensorFlow's triangular solve (benchmarks/README.md, "Design measurements").
    Works eagerly and inside graphs; a matrix of unknown static size falls back to ``tf.linalg.triangular_solve``.

    Parameters
    ----------
    lower
        (P, P) lower-triangular matrix (the strictly upper part is ignored).
    rhs
        (P, K) right-hand sides, same dtype.
    adjoint
        Solve with ``Lᵀ`` instead of ``L``.
    block_size
        Largest diagonal block solved directly (>= 1).

    Returns
    -------
    tf.Tensor
        (P, K) solution ``X``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    size = lower.shape[0]
    if size is None or size <= block_size:
        return tf.linalg.triangular_solve(lower, rhs, lower=True, adjoint=adjoint)
    half = size // 2
    top_left, bottom_left, bottom_right = lower[:half, :half], lower[half:, :half], lower[half:, half:]
    if not adjoint:
        top = blocked_triangular_solve(top_left, rhs[:half], False, block_size)
        bottom = blocked_triangular_solve(bottom_right, rhs[half:] - tf.matmul(bottom_left, top), False, block_size)
    else:
        bottom = blocked_triangular_solve(bottom_right, rhs[half:], True, block_size)
        top = blocked_triangular_solve(top_left, rhs[:half] - tf.matmul(bottom_left, bottom, transpose_a=True), True,
                                       block_size)
    return tf.concat([top, bottom], axis=0)


def blocked_cholesky_solve(lower: tf.Tensor, rhs: tf.Tensor,
                           block_size: int = DEFAULT_TRIANGULAR_BLOCK) -> tf.Tensor:
    """Solve ``(L Lᵀ) X = B`` given the Cholesky factor ``L`` (P, P) and ``B`` (P, K): two blocked triangular
    solves (see :func:`blocked_triangular_solve`). Returns (P, K)."""
    return blocked_triangular_solve(lower, blocked_triangular_solve(lower, rhs, False, block_size), True, block_size)


DEFAULT_CHOLESKY_BLOCK = 512


def blocked_cholesky(matrix: tf.Tensor, block_size: int = DEFAULT_CHOLESKY_BLOCK) -> tf.Tensor:
    """Lower Cholesky factor ``L`` (``L Lᵀ = A``) of a symmetric positive definite ``A`` (P, P), by recursive halving.

    ``A = [[A11, A21ᵀ], [A21, A22]]``: ``L11 = chol(A11)``, ``L21 = A21 L11⁻ᵀ`` (a blocked triangular solve),
    ``L22 = chol(A22 - L21 L21ᵀ)``, down to diagonal blocks of at most ``block_size`` rows factored by
    ``tf.linalg.cholesky``. Most of the ``P³ / 3`` operations become matrix products, which use every core, while
    TensorFlow's Cholesky runs on one. Only the lower triangle of ``A`` is read. Works eagerly and inside graphs; a
    matrix of unknown static size falls back to ``tf.linalg.cholesky``. When ``A`` is not positive definite, the
    factor holds NaN (or ``tf.errors.InvalidArgumentError`` is raised), as with ``tf.linalg.cholesky``;
    :func:`cholesky_or_none` turns both into ``None``.

    Parameters
    ----------
    matrix
        (P, P) symmetric positive definite matrix.
    block_size
        Largest diagonal block factored directly (>= 1).

    Returns
    -------
    tf.Tensor
        (P, P) lower-triangular factor, same dtype.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    size = matrix.shape[0]
    if size is None or size <= block_size:
        return tf.linalg.cholesky(matrix)
    half = size // 2
    top_left = blocked_cholesky(matrix[:half, :half], block_size)
    bottom_left = tf.transpose(blocked_triangular_solve(top_left, tf.transpose(matrix[half:, :half])))
    schur = matrix[half:, half:] - tf.matmul(bottom_left, bottom_left, transpose_b=True)
    bottom_right = blocked_cholesky(schur, block_size)
    upper_right = tf.zeros([half, size - half], matrix.dtype)
    return tf.concat([tf.concat([top_left, upper_right], 1), tf.concat([bottom_left, bottom_right], 1)], 0)


# A factor in the model's (lower) precision is kept when the estimated condition number times its machine epsilon is
# at most this (float32: condition number up to ~170, relative errors of solves ~1e-5 at worst); otherwise float64.
FACTOR_ACCURACY = 1e-5
_CONDITION_ITERATIONS = 6


def condition_estimate(matrix: tf.Tensor, factor: tf.Tensor) -> float:
    """Estimate of the condition number of the SPD ``matrix`` (P, P) from its Cholesky ``factor``: power iteration
    for the largest eigenvalue, inverse iteration (two triangular solves per step) for the smallest. Both start
    from a fixed vector; the estimate is, up to convergence, a lower bound of the condition number."""
    start = tf.cast(tf.math.cos(tf.range(tf.shape(matrix)[0], dtype=tf.float32) * 0.618)[:, None] + 1.5,
                    matrix.dtype)
    largest = smallest = start / tf.norm(start)
    for _ in range(_CONDITION_ITERATIONS):
        largest = tf.matmul(matrix, largest)
        largest /= tf.norm(largest)
        smallest = tf.linalg.cholesky_solve(factor, smallest)
        smallest /= tf.norm(smallest)
    top = tf.reduce_sum(largest * tf.matmul(matrix, largest))
    bottom = tf.reduce_sum(smallest * tf.matmul(matrix, smallest))
    return float(top / bottom) if float(bottom) > 0 else float("inf")


def damped_cholesky(damped: tf.Tensor, dtype: tf.DType) -> Optional[tf.Tensor]:
    """Cholesky factor of a symmetric damped Hessian ``H + λI`` (P, P), or ``None`` when it is not positive
    definite.

    The factorisation runs in ``dtype`` when that is a lower precision and the matrix is well conditioned enough
    for it (condition estimate × eps <= ``FACTOR_ACCURACY``), since it costs about half as much as in float64;
    otherwise in float64.
    """
    if dtype != tf.float64:
        damped_low = tf.cast(damped, dtype)
        factor = cholesky_or_none(damped_low)
        epsilon = float(np.finfo(dtype.as_numpy_dtype).eps)  # pylint: disable=no-member
        if factor is not None and condition_estimate(damped_low, factor) * epsilon <= FACTOR_ACCURACY:
            return factor
    return cholesky_or_none(tf.cast(damped, tf.float64))


def cholesky_or_none(matrix: tf.Tensor) -> Optional[tf.Tensor]:
    """Cholesky factor (:func:`blocked_cholesky`) of a symmetric matrix, or ``None`` when it fails (not positive
    definite)."""
    try:
        factor = blocked_cholesky(matrix)
    except tf.errors.InvalidArgumentError:
        return None
    return factor if bool(tf.reduce_all(tf.math.is_finite(factor))) else None


def lower_cholesky(matrix: np.ndarray, use_scipy: bool = True) -> np.ndarray:
    """Lower Cholesky factor of a symmetric positive definite NumPy matrix (P, P), in its dtype: LAPACK's ``potrf``
    through SciPy when it is installed (at P = 2,048 on 2 cores: 61 ms in float32, 91 ms in float64, against
    136 ms and 125 ms through NumPy, which is the fallback).

    Raises
    ------
    numpy.linalg.LinAlgError
        If the matrix is not positive definite.
    """
    if use_scipy:
        try:
            import scipy.linalg  # pylint: disable=import-outside-toplevel
        except ImportError:
            pass
        else:
            return scipy.linalg.cholesky(matrix, lower=True, check_finite=False)
    return np.linalg.cholesky(matrix)


def symmetric_eigh(matrix: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix (P, P): ``((P,), (P, P))``, same dtype.

    Eagerly this calls LAPACK through NumPy (divide and conquer), several times faster than ``tf.linalg.eigh``
    on CPU; inside a graph it is ``tf.linalg.eigh``.
    Only the lower triangle is read. NumPy's BLAS threads keep spinning for a moment after the call and slow the
    TensorFlow operations that follow: inside a loop of TensorFlow work (block CG's rank-revealing step) it measured
    slower overall than ``tf.linalg.eigh``, so use it for one-off decompositions.
    """
    if not tf.executing_eagerly():
        return tf.linalg.eigh(matrix)
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(matrix), UPLO="L")
    return tf.constant(eigenvalues, matrix.dtype), tf.constant(eigenvectors, matrix.dtype)


def symmetric_eigvalsh(matrix: tf.Tensor) -> tf.Tensor:
    """Eigenvalues (ascending) of a symmetric matrix (P, P): (P,), same dtype; through NumPy's LAPACK when eager
    (see :func:`symmetric_eigh`), ``tf.linalg.eigvalsh`` inside a graph. Only the lower triangle is read."""
    if not tf.executing_eagerly():
        return tf.linalg.eigvalsh(matrix)
    return tf.constant(np.linalg.eigvalsh(np.asarray(matrix), UPLO="L"), matrix.dtype)


class LUFactor:
    """LU factorisation with partial pivoting of a square float64 matrix, for solves with an indefinite matrix.

    Eagerly this is LAPACK's ``getrf`` through SciPy when it is installed (about 4x faster than TensorFlow's LU on
    CPU: 14 s against 63 s at P = 13,120 on 2 cores), otherwise ``tf.linalg.lu``; solves run in the same library.

    Parameters
    ----------
    matrix
        (P, P) float64.
    """

    use_scipy = True  # class switch (tests exercise both paths)

    def __init__(self, matrix: tf.Tensor):
        self.dtype = matrix.dtype
        self._scipy = None
        if self.use_scipy:
            try:
                import scipy.linalg  # pylint: disable=import-outside-toplevel
                self._scipy = scipy.linalg
            except ImportError:
                self._scipy = None
        if self._scipy is not None:
            self._factors = self._scipy.lu_factor(np.asarray(matrix), check_finite=False)
            diagonal = np.abs(np.diag(self._factors[0]))
        else:
            self._factors = tf.linalg.lu(matrix)
            diagonal = np.abs(tf.linalg.diag_part(self._factors[0]).numpy())
        self.pivot_ratio = float(diagonal.min() / diagonal.max()) if diagonal.max() > 0 else 0.0

    def solve(self, vectors: tf.Tensor) -> tf.Tensor:
        """``A⁻¹ V``: (P, K) -> (P, K), float64."""
        vectors = tf.cast(vectors, self.dtype)
        if self._scipy is not None:
            if tf.executing_eagerly():
                return tf.constant(self._scipy.lu_solve(self._factors, vectors.numpy(), check_finite=False),
                                   self.dtype)
            solution = tf.numpy_function(lambda rhs: self._scipy.lu_solve(self._factors, rhs, check_finite=False),
                                         [vectors], self.dtype)
            solution.set_shape(vectors.shape)
            return solution
        return tf.linalg.lu_solve(self._factors[0], self._factors[1], vectors)
