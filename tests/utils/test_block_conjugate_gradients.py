"""Tests of ``block_conjugate_gradients_solve`` and ``KrylovBasis`` against dense numpy solutions."""
# pylint: disable=missing-function-docstring
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import KrylovBasis, block_conjugate_gradients_solve, conjugate_gradients_solve


def spd_with_spectrum(eigenvalues, seed):
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (rotation * np.asarray(eigenvalues)) @ rotation.T


def counting_operator(matrix):
    """Operator applying ``matrix`` that records the number of columns it was applied to."""
    matrix = tf.constant(matrix)
    calls = []

    def operator(vectors):
        calls.append(int(vectors.shape[1]))
        return tf.matmul(matrix, vectors)
    return operator, calls


def column_residuals(matrix, solution, rhs):
    return np.linalg.norm(matrix @ solution - rhs, axis=0) / np.linalg.norm(rhs, axis=0)


def test_float64_solution_and_residual_semantics():
    matrix = spd_with_spectrum(np.logspace(-1, 2, 40), seed=0)
    rhs = np.random.default_rng(1).normal(size=(40, 5))
    operator, calls = counting_operator(matrix)
    solution, info = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=100, tol=1e-10, atol=0.0,
                                                     return_info=True)
    assert solution.dtype == tf.float64 and solution.shape == (40, 5)
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=1e-7, atol=1e-9)
    assert np.all(column_residuals(matrix, solution.numpy(), rhs) <= 1e-9)
    assert info["iterations"] == len(calls) and info["operator_columns"] == sum(calls)
    np.testing.assert_allclose(info["residual_norm"].numpy(), np.linalg.norm(matrix @ solution.numpy() - rhs, axis=0),
                               rtol=1e-3, atol=1e-12)


def test_block_needs_fewer_operator_columns_than_columnwise_cg():
    """On a spread spectrum, 10 right-hand sides sharing one Krylov space converge with far fewer products."""
    matrix = spd_with_spectrum(np.logspace(-2, 2, 200), seed=2)
    rhs = np.random.default_rng(3).normal(size=(200, 10))
    operator, calls = counting_operator(matrix)
    block = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=500, tol=1e-8, atol=0.0)
    _, info = conjugate_gradients_solve(counting_operator(matrix)[0], tf.constant(rhs), maxiter=2000, tol=1e-8,
                                        atol=0.0, return_info=True)
    columnwise_columns = int(info["iterations"]) * 10
    assert np.all(column_residuals(matrix, block.numpy(), rhs) <= 1e-7)
    assert sum(calls) < 0.5 * columnwise_columns
    # The block Krylov space is the whole space after ceil(200 / 10) iterations; keeping every direction (full
    # A-orthogonalisation, as in exact arithmetic) reaches that bound, plain block CG needs somewhat more.
    operator, full_calls = counting_operator(matrix)
    block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=500, tol=1e-8, atol=0.0,
                                    basis=KrylovBasis(capacity=1000))
    assert len(full_calls) <= 200 // 10 + 1 < len(calls)


def test_rank_deficient_block_does_not_break_down():
    """Identical, zero and eigenvector columns: dependent directions are dropped, not divided by zero."""
    eigenvalues = np.linspace(1.0, 5.0, 30)
    matrix = spd_with_spectrum(eigenvalues, seed=4)
    _, eigenvectors = np.linalg.eigh(matrix)
    base = np.random.default_rng(5).normal(size=30)
    rhs = np.stack([base, base, 2.0 * base, np.zeros(30), eigenvectors[:, 7]], axis=1)
    operator, calls = counting_operator(matrix)
    solution = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=100, tol=1e-12, atol=0.0)
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(solution.numpy()))
    assert calls[0] == 2  # span{base, eigenvector}: the zero and repeated columns add no direction


def test_float32_vector_input_and_preconditioner():
    matrix = spd_with_spectrum(np.logspace(0, 3, 50), seed=6)
    rhs = np.random.default_rng(7).normal(size=50).astype(np.float32)
    operator, calls = counting_operator(matrix.astype(np.float32))
    solution = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=200, tol=1e-5, atol=0.0)
    assert solution.dtype == tf.float32 and solution.shape == (50,)
    expected = np.linalg.solve(matrix, rhs.astype(np.float64))
    assert np.linalg.norm(solution.numpy() - expected) / np.linalg.norm(expected) < 1e-3
    # The exact inverse as preconditioner: one iteration.
    inverse = tf.constant(np.linalg.inv(matrix).astype(np.float32))
    operator, calls = counting_operator(matrix.astype(np.float32))
    block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=200, tol=1e-5, atol=0.0,
                                    M=lambda vectors: tf.matmul(inverse, vectors))
    assert len(calls) == 1


def test_maxiter_stops_and_zero_iterations_returns_start():
    matrix = spd_with_spectrum(np.logspace(-2, 2, 60), seed=8)
    rhs = np.random.default_rng(9).normal(size=(60, 2))
    operator, calls = counting_operator(matrix)
    solution, info = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=3, tol=1e-12, atol=0.0,
                                                     return_info=True)
    assert info["iterations"] == 3 and len(calls) == 3
    assert np.all(column_residuals(matrix, solution.numpy(), rhs) > 1e-6)
    zero = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=0, tol=1e-12, atol=0.0)
    np.testing.assert_array_equal(zero.numpy(), np.zeros_like(rhs))
    with pytest.raises(ValueError, match="maxiter"):
        block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=-1)


def test_indefinite_operator_is_reported():
    matrix = spd_with_spectrum(np.concatenate([-np.ones(3), np.ones(7)]), seed=10)
    rhs = np.random.default_rng(11).normal(size=(10, 4))
    with pytest.raises(ValueError, match="positive definite"):
        block_conjugate_gradients_solve(counting_operator(matrix)[0], tf.constant(rhs), maxiter=50, tol=1e-10)


def test_recycled_directions_make_later_solves_cheaper():
    """Directions kept from earlier solves: the same answers, with fewer and fewer operator columns; once the
    basis spans the space, a solve is a projection without any operator application."""
    size = 80
    matrix = spd_with_spectrum(np.logspace(-1, 1, size), seed=12)
    rng = np.random.default_rng(13)
    basis = KrylovBasis(capacity=10_000)
    spent = []
    for _ in range(4):
        rhs = rng.normal(size=(size, 8))
        operator, calls = counting_operator(matrix)
        solution = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=200, tol=1e-10, atol=0.0,
                                                   basis=basis)
        np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=1e-6, atol=1e-8)
        spent.append(sum(calls))
    assert basis.size <= size
    assert spent[-1] == 0 and spent[1] < spent[0]
    stored = basis.directions.numpy()
    np.testing.assert_allclose(stored.T @ matrix @ stored, np.eye(basis.size), atol=1e-8)  # A-orthonormal


def test_recycling_capacity_is_respected():
    matrix = spd_with_spectrum(np.logspace(-1, 1, 50), seed=14)
    rhs = np.random.default_rng(15).normal(size=(50, 6))
    basis = KrylovBasis(capacity=10)
    solution = block_conjugate_gradients_solve(counting_operator(matrix)[0], tf.constant(rhs), maxiter=100,
                                               tol=1e-10, atol=0.0, basis=basis)
    assert basis.size == 10
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs), rtol=1e-6, atol=1e-8)
    basis.clear()
    assert basis.size == 0
    with pytest.raises(ValueError, match="capacity"):
        KrylovBasis(-1)


def test_recycled_float32_solves_keep_the_tolerance_over_many_batches():
    """In float32 the kept directions are A-orthonormal only up to rounding; later solves must still reach the
    requested residual against the exact (float64) matrix, not just the residual they track."""
    size = 300
    matrix = spd_with_spectrum(np.logspace(-1, 0.5, size), seed=16)
    operator = counting_operator(matrix.astype(np.float32))[0]
    rng = np.random.default_rng(17)
    basis = KrylovBasis(capacity=size)
    worst = []
    for _ in range(6):
        rhs = rng.normal(size=(size, 60)).astype(np.float32)
        solution = block_conjugate_gradients_solve(operator, tf.constant(rhs), maxiter=200, tol=1e-5, atol=0.0,
                                                   basis=basis)
        worst.append(column_residuals(matrix, solution.numpy().astype(np.float64), rhs.astype(np.float64)).max())
    assert basis.size > 0
    assert max(worst) <= 2e-5, worst


def test_cholesky_qr_and_eigendecomposition_give_orthonormal_bases():
    from deel.influenciae.utils.conjugate_gradients import _orthonormal_basis  # pylint: disable=C0415,W0212
    rng = np.random.default_rng(18)
    well_conditioned = rng.normal(size=(50, 6))
    basis = _orthonormal_basis(tf.constant(well_conditioned), 1e-7).numpy()  # Cholesky QR path
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(basis @ (basis.T @ well_conditioned), well_conditioned, atol=1e-10)
    dependent = np.hstack([well_conditioned, well_conditioned[:, :2] @ rng.normal(size=(2, 3))])  # rank 6
    dependent /= np.linalg.norm(dependent, axis=0)  # unit columns, as in the solver
    basis = _orthonormal_basis(tf.constant(dependent), 1e-6).numpy()  # eigendecomposition path, drops 3
    assert basis.shape == (50, 6)
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-8)
    np.testing.assert_allclose(basis @ (basis.T @ dependent), dependent, atol=1e-8)
