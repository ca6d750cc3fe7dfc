"""ArnoldiIHVP and the Arnoldi iteration against float64 numpy eigendecompositions of closed-form Hessians."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import ArnoldiIHVP, ArnoldiIHVPFactory, ExactIHVP, InfluenceModel
from deel.influenciae.common.arnoldi_ihvp import arnoldi_iteration, compiled_arnoldi_iteration, distill
from deel.influenciae.influence import FirstOrderInfluenceCalculator, SecondOrderInfluenceCalculator

N_SAMPLES, N_FEATURES = 100, 10


def linear_regression(x=None, seed=0):
    """Float64 linear regression ``f(x) = x w`` with squared loss: H = 2/n XᵀX, g_i = 2 (x_i·w − y_i) x_i."""
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.normal(size=(N_SAMPLES, N_FEATURES))
    y = x @ rng.normal(size=(x.shape[1], 1)) + 0.3 * rng.normal(size=(len(x), 1))
    keras.utils.set_random_seed(seed)
    keras_model = keras.Sequential([keras.Input((x.shape[1],), dtype="float64"),
                                    keras.layers.Dense(1, use_bias=False, dtype="float64")])
    model = InfluenceModel(keras_model, start_layer=0,
                           loss_function=keras.losses.MeanSquaredError(reduction=None, dtype="float64"))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    weights = keras_model.layers[0].kernel.numpy()
    gradients = 2.0 * (x @ weights - y) * x
    return model, dataset, 2.0 * x.T @ x / len(x), gradients


def _inverse_from(ihvp):
    g_matrix = ihvp.G.numpy()
    return (g_matrix.T * ihvp.inverse_eig_vals.numpy()) @ g_matrix


@pytest.mark.parametrize("force_hermitian", [True, False])
def test_full_subspace_recovers_the_inverse_hessian(force_hermitian):
    model, dataset, hessian, gradients = linear_regression()
    ihvp = ArnoldiIHVP(model, dataset, N_FEATURES, N_FEATURES, force_hermitian, seed=3)
    expected_eigenvalues = np.linalg.eigvalsh(hessian)[::-1]
    np.testing.assert_allclose(ihvp.eig_vals.numpy(), expected_eigenvalues, rtol=1e-10)
    assert np.abs(_inverse_from(ihvp) - np.linalg.inv(hessian)).max() < 1e-6
    np.testing.assert_allclose(ihvp.G.numpy() @ ihvp.G.numpy().T, np.eye(N_FEATURES), atol=1e-10)
    columns = np.concatenate([block.numpy() for block in ihvp.compute_ihvp(dataset)], axis=1)
    np.testing.assert_allclose(columns, np.linalg.solve(hessian, gradients.T), rtol=1e-8, atol=1e-10)
    hvp = np.concatenate([block.numpy() for block in ihvp.compute_hvp(dataset)], axis=1)
    np.testing.assert_allclose(hvp, hessian @ gradients.T, rtol=1e-8, atol=1e-10)


def test_keeps_the_eigenvalues_of_largest_magnitude():
    model, dataset, hessian, _ = linear_regression()
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    ihvp = ArnoldiIHVP(model, dataset, N_FEATURES, 3, seed=0)
    np.testing.assert_allclose(ihvp.eig_vals.numpy(), eigenvalues[::-1][:3], rtol=1e-10)
    top = eigenvectors[:, ::-1][:, :3]
    expected = top @ np.diag(1.0 / eigenvalues[::-1][:3]) @ top.T  # projector-restricted inverse
    assert np.abs(_inverse_from(ihvp) - expected).max() < 1e-8


def test_regularization_shifts_the_eigenvalues():
    model, dataset, hessian, gradients = linear_regression()
    ihvp = ArnoldiIHVP(model, dataset, N_FEATURES, N_FEATURES, regularization=0.5, seed=0)
    np.testing.assert_allclose(ihvp.eig_vals.numpy(), np.linalg.eigvalsh(hessian)[::-1], rtol=1e-10)
    solved = ihvp.apply_inverse(tf.constant(gradients.T)).numpy()
    np.testing.assert_allclose(solved, np.linalg.solve(hessian + 0.5 * np.eye(N_FEATURES), gradients.T), rtol=1e-8)


def test_krylov_breakdown_restarts_without_nan():
    # XᵀX/n has only two distinct eigenvalues: a Krylov space from any start vector has dimension <= 2.
    rng = np.random.default_rng(5)
    basis, _ = np.linalg.qr(rng.normal(size=(60, 6)))
    x = np.sqrt(60 / 2) * basis * np.sqrt([1.0, 1.0, 1.0, 4.0, 4.0, 4.0])[None, :]
    model, dataset, hessian, _ = linear_regression(x)
    np.testing.assert_allclose(np.linalg.eigvalsh(hessian), [1, 1, 1, 4, 4, 4], atol=1e-10)
    ihvp = ArnoldiIHVP(model, dataset, 6, 6, seed=1)
    assert ihvp.restarts >= 2
    assert np.all(np.isfinite(ihvp.G.numpy()))
    np.testing.assert_allclose(np.sort(ihvp.eig_vals.numpy()), [1, 1, 1, 4, 4, 4], atol=1e-8)
    assert np.abs(_inverse_from(ihvp) - np.linalg.inv(hessian)).max() < 1e-8


def test_arnoldi_iteration_on_a_numpy_matrix():
    rng = np.random.default_rng(0)
    symmetric = rng.normal(size=(8, 8))
    symmetric = symmetric + symmetric.T
    basis, projected, restarts = arnoldi_iteration(lambda v: symmetric @ v, rng.normal(size=8), 5, rng)
    assert restarts == 0
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(projected, basis @ symmetric @ basis.T, atol=1e-10)
    np.testing.assert_allclose(np.triu(projected, 2), 0.0, atol=1e-10)  # tridiagonal for a symmetric operator
    general = rng.normal(size=(8, 8))
    basis, projected, _ = arnoldi_iteration(lambda v: general @ v, rng.normal(size=8), 8, rng)
    np.testing.assert_allclose(projected, basis @ general @ basis.T, atol=1e-10)
    np.testing.assert_allclose(np.tril(projected, -2), 0.0, atol=1e-12)  # upper Hessenberg
    eig_vals, g_matrix = distill(projected, basis, 8, force_hermitian=False)
    assert g_matrix.shape == (8, 8)
    assert np.all(np.isfinite(eig_vals)) and eig_vals.shape == (8,)
    with pytest.raises(ValueError, match="subspace_dim"):
        arnoldi_iteration(lambda v: v, np.ones(3), 4, rng)
    with pytest.raises(ValueError, match="non-zero"):
        arnoldi_iteration(lambda v: v, np.zeros(3), 2, rng)


def test_seed_makes_the_start_vector_reproducible():
    model, dataset, _, _ = linear_regression()
    first = ArnoldiIHVP(model, dataset, 4, 2, seed=7).G.numpy()
    second = ArnoldiIHVP(model, dataset, 4, 2, seed=7).G.numpy()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("subspace_dim, k, message", [(11, 5, "subspace_dim=11 exceeds"),
                                                      (5, 6, "k_largest_eig_vals=6 exceeds"),
                                                      (0, 1, "subspace_dim must be"),
                                                      (5, 0, "k_largest_eig_vals must be")])
def test_invalid_dimensions(subspace_dim, k, message):
    model, dataset, _, _ = linear_regression()
    with pytest.raises(ValueError, match=message):
        ArnoldiIHVP(model, dataset, subspace_dim, k)


def test_usable_wherever_an_ihvp_is_accepted():
    model, dataset, hessian, gradients = linear_regression()
    regularization = 0.2
    exact = FirstOrderInfluenceCalculator(model, dataset, ExactIHVP(model, dataset, regularization=regularization))
    expected = exact.estimate_influence_values_matrix(dataset, dataset).numpy()
    np.testing.assert_allclose(expected, gradients @ np.linalg.solve(hessian + regularization * np.eye(N_FEATURES),
                                                                     gradients.T), rtol=1e-8)
    for solver in (ArnoldiIHVP(model, dataset, N_FEATURES, N_FEATURES, regularization=regularization, seed=0),
                   ArnoldiIHVPFactory(N_FEATURES, N_FEATURES, regularization=regularization, seed=0).build(model,
                                                                                                         dataset)):
        calculator = FirstOrderInfluenceCalculator(model, dataset, solver)
        assert np.abs(calculator.estimate_influence_values_matrix(dataset, dataset).numpy() - expected).max() \
            < 1e-6 * np.abs(expected).max()
    # A class is built with its defaults (subspace_dim = k = min(P, 200) = P) and the regularization passed through.
    by_class = FirstOrderInfluenceCalculator(model, dataset, ArnoldiIHVP, regularization=regularization)
    assert isinstance(by_class.ihvp_calculator, ArnoldiIHVP)
    assert np.abs(by_class.estimate_influence_values_matrix(dataset, dataset).numpy() - expected).max() \
        < 1e-6 * np.abs(expected).max()
    group = dataset.take(3)
    second_exact = SecondOrderInfluenceCalculator(model, dataset, "exact", regularization=regularization)
    second_arnoldi = SecondOrderInfluenceCalculator(model, dataset, ArnoldiIHVP, regularization=regularization)
    np.testing.assert_allclose(second_arnoldi.compute_influence_vector_group(group).numpy(),
                               second_exact.compute_influence_vector_group(group).numpy(), rtol=1e-7)


def test_arnoldi_factory_in_rps_lje():
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.common import ExactIHVPFactory
    from deel.influenciae.rps import RepresenterPointLJE
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 4))
    y = np.eye(3)[rng.integers(0, 3, size=24)]
    keras.utils.set_random_seed(4)
    keras_model = keras.Sequential([keras.Input((4,), dtype="float64"),
                                    keras.layers.Dense(3, activation="tanh", dtype="float64"),
                                    keras.layers.Dense(3, use_bias=False, dtype="float64")])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    model = InfluenceModel(keras_model, start_layer=-1, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((x[:18], y[:18])).batch(6)
    test = tf.data.Dataset.from_tensor_slices((x[18:], y[18:])).batch(6)
    exact = RepresenterPointLJE(model, train, ExactIHVPFactory()).estimate_influence_values_matrix(test, train)
    arnoldi = RepresenterPointLJE(model, train, ArnoldiIHVPFactory(9, 9, seed=0))
    assert isinstance(arnoldi.ihvp_calculator, ArnoldiIHVP)
    values = arnoldi.estimate_influence_values_matrix(test, train).numpy()
    assert np.abs(values - exact.numpy()).max() < 1e-6 * np.abs(exact.numpy()).max()


def test_compiled_iteration_matches_the_python_loop_and_reports_breakdowns():
    rng = np.random.default_rng(3)
    general = rng.normal(size=(9, 9))
    start = rng.normal(size=9)
    operator = tf.constant(general)
    compiled = compiled_arnoldi_iteration(lambda v: tf.matmul(operator, v), start, 7, dtype=tf.float64)
    assert compiled is not None
    basis, projected, restarts = arnoldi_iteration(lambda v: general @ v, start, 7, rng)
    assert restarts == 0
    np.testing.assert_allclose(compiled[0], basis, atol=1e-12)
    np.testing.assert_allclose(compiled[1], projected, atol=1e-12)
    np.testing.assert_allclose(compiled[1], compiled[0] @ general @ compiled[0].T, atol=1e-10)
    # span{e_0} is invariant under a diagonal operator: breakdown after one step, left to the Python loop.
    diagonal = tf.constant(np.diag(np.arange(1.0, 6.0)))
    assert compiled_arnoldi_iteration(lambda v: tf.matmul(diagonal, v), np.eye(5)[0], 3, dtype=tf.float64) is None
    # A breakdown at the very last step is no breakdown: the basis is complete.
    full = compiled_arnoldi_iteration(lambda v: tf.matmul(diagonal, v), np.eye(5)[0], 1, dtype=tf.float64)
    np.testing.assert_allclose(full[0], np.eye(5)[:1])
    np.testing.assert_allclose(full[1], [[1.0]])
