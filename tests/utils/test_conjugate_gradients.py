"""Tests of ``deel.influenciae.utils.conjugate_gradients_solve`` against dense numpy solutions."""
# pylint: disable=missing-function-docstring
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import conjugate_gradients_solve


def random_spd(size, seed, dtype=np.float64, shift=1.0):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size))
    return (factor @ factor.T / size + shift * np.eye(size)).astype(dtype)


def matrix_operator(matrix):
    matrix = tf.constant(matrix)
    return lambda vectors: tf.matmul(matrix, vectors)


def relative_error(estimate, truth):
    return np.linalg.norm(estimate - truth) / np.linalg.norm(truth)


def krylov_minimiser(matrix, rhs, steps):
    """Exact CG iterate after ``steps`` steps from zero: argmin of the A-norm error over span{b, Ab, ...}."""
    basis = [rhs]
    for _ in range(steps - 1):
        basis.append(matrix @ basis[-1])
    basis, _ = np.linalg.qr(np.stack(basis, axis=1))
    coefficients = np.linalg.solve(basis.T @ matrix @ basis, basis.T @ rhs)
    return basis @ coefficients


def test_float64_several_right_hand_sides():
    matrix = random_spd(12, seed=0)
    rng = np.random.default_rng(1)
    rhs = rng.normal(size=(12, 3))
    solution = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=200, tol=1e-13, atol=0.0)
    assert solution.dtype == tf.float64 and solution.shape == (12, 3)
    expected = np.linalg.solve(matrix, rhs)
    for column in range(3):
        assert relative_error(solution.numpy()[:, column], expected[:, column]) < 1e-8


def test_float32_system():
    matrix = random_spd(10, seed=2, dtype=np.float32)
    rhs = np.random.default_rng(3).normal(size=(10, 2)).astype(np.float32)
    solution = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=100, tol=1e-6, atol=0.0)
    assert solution.dtype == tf.float32
    expected = np.linalg.solve(matrix.astype(np.float64), rhs.astype(np.float64))
    assert relative_error(solution.numpy(), expected) < 1e-4


def test_columns_converge_at_different_speeds():
    """An eigenvector right-hand side converges in one step; the other columns are not held back or disturbed."""
    matrix = random_spd(10, seed=4)
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    rng = np.random.default_rng(5)
    rhs = np.stack([eigenvectors[:, 3], rng.normal(size=10), np.zeros(10)], axis=1)
    solution, info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=100, tol=1e-12,
                                               atol=1e-30, return_info=True)
    solution = solution.numpy()
    np.testing.assert_allclose(solution[:, 0], eigenvectors[:, 3] / eigenvalues[3], rtol=0, atol=1e-12)
    assert relative_error(solution[:, 1], np.linalg.solve(matrix, rhs[:, 1])) < 1e-8
    np.testing.assert_array_equal(solution[:, 2], np.zeros(10))  # zero right-hand side: no NaN, stays at zero
    assert int(info["iterations"]) > 1

    _, info_alone = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs[:, :1]), maxiter=100,
                                              tol=1e-12, atol=1e-30, return_info=True)
    assert int(info_alone["iterations"]) == 1
    # Each column gives the same answer as when solved on its own.
    alone = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs[:, 1:2]), maxiter=100, tol=1e-12,
                                      atol=1e-30)
    np.testing.assert_allclose(solution[:, 1:2], alone.numpy(), rtol=0, atol=1e-10)


def test_one_dimensional_right_hand_side():
    matrix = random_spd(8, seed=6)
    rhs = np.random.default_rng(7).normal(size=8)
    solution = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=100, tol=1e-13, atol=0.0)
    assert solution.shape == (8,)
    assert relative_error(solution.numpy(), np.linalg.solve(matrix, rhs)) < 1e-8


def test_starting_point():
    matrix = random_spd(8, seed=8)
    rhs = np.random.default_rng(9).normal(size=(8, 2))
    exact = np.linalg.solve(matrix, rhs)
    solution, info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), x0=tf.constant(exact),
                                               maxiter=50, tol=1e-8, atol=0.0, return_info=True)
    assert int(info["iterations"]) == 0
    np.testing.assert_array_equal(solution.numpy(), exact)

    start = exact + 1e-3 * np.random.default_rng(10).normal(size=exact.shape)
    solution = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), x0=tf.constant(start),
                                         maxiter=100, tol=1e-13, atol=0.0)
    assert relative_error(solution.numpy(), exact) < 1e-8

    # One step from x0 minimises the A-norm error on x0 + span{r0}, r0 = b - A x0.
    start = np.random.default_rng(11).normal(size=8)
    vector_rhs = rhs[:, 0]
    residual = vector_rhs - matrix @ start
    expected = start + krylov_minimiser(matrix, residual, 1)
    solution = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(vector_rhs), x0=tf.constant(start),
                                         maxiter=1, tol=0.0, atol=0.0)
    np.testing.assert_allclose(solution.numpy(), expected, rtol=0, atol=1e-10)


def test_jacobi_preconditioner_reduces_iterations():
    size = 30
    scales = np.logspace(0, 4, size)
    matrix = np.sqrt(scales)[:, None] * random_spd(size, seed=12, shift=2.0) * np.sqrt(scales)[None, :]
    diagonal = tf.constant(np.diag(matrix)[:, None])
    rhs = np.random.default_rng(13).normal(size=(size, 2))
    expected = np.linalg.solve(matrix, rhs)

    plain, plain_info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=500, tol=1e-10,
                                                  atol=0.0, return_info=True)
    jacobi, jacobi_info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=500,
                                                    tol=1e-10, atol=0.0, M=lambda r: r / diagonal, return_info=True)
    assert relative_error(jacobi.numpy(), expected) < 1e-6
    assert relative_error(plain.numpy(), expected) < 1e-6
    assert int(jacobi_info["iterations"]) < int(plain_info["iterations"])
    assert int(jacobi_info["iterations"]) <= size


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maxiter_is_respected(steps):
    matrix = random_spd(10, seed=14)
    rhs = np.random.default_rng(15).normal(size=10)
    solution, info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=steps, tol=1e-14,
                                               atol=0.0, return_info=True)
    assert int(info["iterations"]) == steps
    np.testing.assert_allclose(solution.numpy(), krylov_minimiser(matrix, rhs, steps), rtol=0, atol=1e-9)
    np.testing.assert_allclose(info["residual_norm"].numpy(), [np.linalg.norm(rhs - matrix @ solution.numpy())],
                               rtol=1e-8)


def test_maxiter_zero_returns_start():
    matrix = random_spd(4, seed=16)
    rhs = tf.constant(np.ones((4, 2)))
    solution = conjugate_gradients_solve(matrix_operator(matrix), rhs, maxiter=0)
    np.testing.assert_array_equal(solution.numpy(), np.zeros((4, 2)))


def test_default_tolerance_stops_early():
    matrix = random_spd(40, seed=17)
    rhs = np.random.default_rng(18).normal(size=(40, 1))
    solution, info = conjugate_gradients_solve(matrix_operator(matrix), tf.constant(rhs), maxiter=1000,
                                               return_info=True)
    residual = np.linalg.norm(rhs - matrix @ solution.numpy())
    assert residual <= 1e-3 * np.linalg.norm(rhs) * (1 + 1e-9)
    assert 0 < int(info["iterations"]) < 40


def test_inside_tf_function():
    matrix = random_spd(6, seed=19)
    rhs = np.random.default_rng(20).normal(size=(6, 2))

    @tf.function
    def solve(right_hand_side):
        return conjugate_gradients_solve(matrix_operator(matrix), right_hand_side, maxiter=50, tol=1e-13, atol=0.0)

    assert relative_error(solve(tf.constant(rhs)).numpy(), np.linalg.solve(matrix, rhs)) < 1e-8


def test_negative_maxiter():
    with pytest.raises(ValueError):
        conjugate_gradients_solve(lambda v: v, tf.ones((3, 1)), maxiter=-1)
