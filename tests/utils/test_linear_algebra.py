"""Blocked triangular solves, blocked Cholesky factorisations and LAPACK eigendecompositions against NumPy
float64 references."""
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils.linear_algebra import (blocked_cholesky, blocked_cholesky_solve, blocked_triangular_solve,
                                                   cholesky_or_none, lower_cholesky, symmetric_eigh,
                                                   symmetric_eigvalsh)


def spd_matrix(size, seed):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size))
    return factor @ factor.T / size + np.eye(size)


@pytest.mark.parametrize("size, block_size", [(1, 1), (7, 1), (37, 4), (64, 16), (101, 256), (300, 32)])
@pytest.mark.parametrize("adjoint", [False, True])
def test_blocked_triangular_solve_matches_numpy(size, block_size, adjoint):
    lower = np.linalg.cholesky(spd_matrix(size, seed=size))
    rhs = np.random.default_rng(1).normal(size=(size, 5))
    # The strictly upper part must be ignored: fill it with garbage.
    stored = lower + np.triu(np.full((size, size), 7.0), k=1)
    solved = blocked_triangular_solve(tf.constant(stored), tf.constant(rhs), adjoint=adjoint,
                                      block_size=block_size).numpy()
    expected = np.linalg.solve(lower.T if adjoint else lower, rhs)
    np.testing.assert_allclose(solved, expected, rtol=1e-10, atol=1e-12)


def test_blocked_solves_in_a_graph_with_an_unknown_number_of_columns():
    matrix = spd_matrix(50, seed=2)
    lower = tf.constant(np.linalg.cholesky(matrix).astype(np.float32))
    solve = tf.function(lambda rhs: blocked_cholesky_solve(lower, rhs, block_size=8),
                        input_signature=[tf.TensorSpec((50, None), tf.float32)])
    rhs = np.random.default_rng(3).normal(size=(50, 3)).astype(np.float32)
    np.testing.assert_allclose(solve(tf.constant(rhs)).numpy(), np.linalg.solve(matrix, rhs), rtol=1e-4, atol=1e-5)


def test_unknown_matrix_size_falls_back_to_tensorflows_solve():
    matrix = spd_matrix(12, seed=4)
    lower = np.linalg.cholesky(matrix)
    solve = tf.function(lambda lower_, rhs: blocked_triangular_solve(lower_, rhs, block_size=2),
                        input_signature=[tf.TensorSpec((None, None), tf.float64),
                                         tf.TensorSpec((None, None), tf.float64)])
    rhs = np.random.default_rng(5).normal(size=(12, 2))
    np.testing.assert_allclose(solve(tf.constant(lower), tf.constant(rhs)).numpy(), np.linalg.solve(lower, rhs),
                               rtol=1e-10)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size"):
        blocked_triangular_solve(tf.eye(3), tf.ones((3, 1)), block_size=0)


@pytest.mark.parametrize("size, block_size", [(1, 1), (2, 1), (9, 2), (37, 4), (100, 512), (301, 32)])
def test_blocked_cholesky_matches_numpy_and_reads_only_the_lower_triangle(size, block_size):
    matrix = spd_matrix(size, seed=size + 10)
    stored = np.tril(matrix) + np.triu(np.full((size, size), -3.0), k=1)  # garbage above the diagonal
    factor = blocked_cholesky(tf.constant(stored), block_size=block_size).numpy()
    np.testing.assert_allclose(factor, np.linalg.cholesky(matrix), rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(factor, k=1) == 0.0)


def test_blocked_cholesky_in_float32_is_as_accurate_as_tensorflows():
    matrix = spd_matrix(600, seed=7)
    exact = np.linalg.cholesky(matrix)
    blocked = blocked_cholesky(tf.constant(matrix, tf.float32), block_size=64).numpy()
    direct = tf.linalg.cholesky(tf.constant(matrix, tf.float32)).numpy()
    blocked_error, direct_error = np.abs(blocked - exact).max(), np.abs(direct - exact).max()
    assert blocked_error < 1e-5 and blocked_error < 4 * direct_error


def test_blocked_cholesky_in_a_graph_and_with_an_unknown_size():
    matrix = spd_matrix(40, seed=8)
    known = tf.function(lambda m: blocked_cholesky(m, block_size=8))
    unknown = tf.function(lambda m: blocked_cholesky(m, block_size=8),
                          input_signature=[tf.TensorSpec((None, None), tf.float64)])
    for function in (known, unknown):
        np.testing.assert_allclose(function(tf.constant(matrix)).numpy(), np.linalg.cholesky(matrix), rtol=1e-10)


def test_not_positive_definite_gives_no_factor():
    matrix = spd_matrix(50, seed=9)
    matrix[40, 40] = -5.0  # the trailing block becomes indefinite
    try:  # tf.linalg.cholesky fills the factor with NaN on CPU (and raises on some devices)
        assert not np.isfinite(blocked_cholesky(tf.constant(matrix), block_size=8).numpy()).all()
    except tf.errors.InvalidArgumentError:
        pass
    assert cholesky_or_none(tf.constant(matrix)) is None
    assert cholesky_or_none(tf.constant(spd_matrix(50, seed=9))) is not None


def test_blocked_cholesky_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size"):
        blocked_cholesky(tf.eye(3), block_size=0)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_symmetric_eigh_diagonalises_and_sorts(dtype):
    rng = np.random.default_rng(11)
    half = rng.normal(size=(30, 30))
    matrix = half + half.T  # indefinite
    stored = np.tril(matrix) + np.triu(np.full((30, 30), 9.0), k=1)  # only the lower triangle counts
    eigenvalues, eigenvectors = symmetric_eigh(tf.constant(stored, dtype))
    assert eigenvalues.dtype == dtype and eigenvectors.dtype == dtype
    values, vectors = eigenvalues.numpy().astype(np.float64), eigenvectors.numpy().astype(np.float64)
    tolerance = 1e-10 if dtype == tf.float64 else 1e-4
    np.testing.assert_allclose(values, np.sort(np.linalg.eigvals(matrix).real), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(matrix @ vectors, vectors * values, atol=tolerance * 10)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(30), atol=tolerance)
    np.testing.assert_allclose(symmetric_eigvalsh(tf.constant(stored, dtype)).numpy(), eigenvalues.numpy(),
                               rtol=tolerance, atol=tolerance)


def test_symmetric_eigh_inside_a_graph_uses_tensorflow():
    matrix = spd_matrix(12, seed=12)
    eigenvalues = tf.function(lambda m: symmetric_eigh(m)[0])(tf.constant(matrix))
    np.testing.assert_allclose(eigenvalues.numpy(), np.linalg.eigvalsh(matrix), rtol=1e-10)
    values_only = tf.function(symmetric_eigvalsh)(tf.constant(matrix))
    np.testing.assert_allclose(values_only.numpy(), np.linalg.eigvalsh(matrix), rtol=1e-10)


@pytest.mark.parametrize("use_scipy", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lower_cholesky_reconstructs_the_matrix_and_rejects_indefinite_ones(use_scipy, dtype):
    """L is lower triangular, in the matrix's dtype, and L Lᵀ gives the matrix back (SciPy's LAPACK and NumPy's
    fallback alike); an indefinite matrix raises LinAlgError."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 24))
    matrix = (features.T @ features / 40 + 0.1 * np.eye(24)).astype(dtype)
    factor = lower_cholesky(matrix, use_scipy=use_scipy)
    assert factor.dtype == dtype and np.all(np.triu(factor, 1) == 0)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(factor.astype(np.float64) @ factor.T.astype(np.float64), matrix.astype(np.float64),
                               rtol=tolerance, atol=tolerance)
    with pytest.raises(np.linalg.LinAlgError):
        lower_cholesky((matrix - 2 * np.eye(24, dtype=dtype) * np.abs(matrix).max()).astype(dtype),
                       use_scipy=use_scipy)
