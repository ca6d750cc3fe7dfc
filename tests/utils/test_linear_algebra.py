"""Blocked triangular and Cholesky solves against NumPy float64 solves."""
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils.linear_algebra import blocked_cholesky_solve, blocked_triangular_solve


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
