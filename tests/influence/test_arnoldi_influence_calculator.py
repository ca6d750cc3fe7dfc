"""ArnoldiInfluenceCalculator: exact on a full Krylov space (float64 linear regression), the shared API's shapes,
errors, and rank agreement with exact first-order influence on a small digits MLP."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

from deel.influenciae.common import CACHE, InfluenceModel
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
from deel.influenciae.utils import ORDER
from tests.common.test_arnoldi_ihvp import N_FEATURES, linear_regression


@pytest.fixture(name="regression", scope="module")
def fixture_regression():
    model, train, hessian, gradients = linear_regression()
    rng = np.random.default_rng(11)
    x_test = rng.normal(size=(12, N_FEATURES))
    y_test = rng.normal(size=(12, 1))
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(5)  # 5, 5, 2
    weights = model.model.layers[0].kernel.numpy()
    test_gradients = 2.0 * (x_test @ weights - y_test) * x_test
    return {"model": model, "train": train, "test": test, "hessian": hessian, "gradients": gradients,
            "test_gradients": test_gradients}


def _max_error(actual, expected):
    return np.abs(np.asarray(actual, np.float64) - expected).max()


@pytest.mark.parametrize("regularization", [0.0, 0.25])
def test_full_subspace_equals_exact_first_order(regression, regularization):
    model, train, test = regression["model"], regression["train"], regression["test"]
    arnoldi = ArnoldiInfluenceCalculator(model, train, N_FEATURES, True, N_FEATURES, dtype=tf.float64,
                                         regularization=regularization, seed=0)
    exact = FirstOrderInfluenceCalculator(model, train, "exact", regularization=regularization)
    inverse = np.linalg.inv(regression["hessian"] + regularization * np.eye(N_FEATURES))
    g_matrix, eig_vals = arnoldi.G.numpy(), arnoldi.eig_vals.numpy()
    assert g_matrix.shape == (N_FEATURES, N_FEATURES) and eig_vals.shape == (N_FEATURES,)
    assert _max_error((g_matrix.T / (eig_vals + regularization)) @ g_matrix, inverse) < 1e-6
    pairwise = regression["test_gradients"] @ inverse @ regression["gradients"].T  # float64 ground truth
    assert _max_error(arnoldi.estimate_influence_values_matrix(test, train), pairwise) < 1e-6
    assert _max_error(arnoldi.estimate_influence_values_matrix(test, train),
                      exact.estimate_influence_values_matrix(test, train)) < 1e-6
    self_influence = np.einsum("ip,pq,iq->i", regression["gradients"], inverse, regression["gradients"])
    assert _max_error(arnoldi._compute_influence_values(train)[:, 0], self_influence) < 1e-6  # pylint: disable=W0212
    rows = []
    for (x_test, _), inner in arnoldi.estimate_influence_values_in_batches(test, train):
        rows.append(np.concatenate([values.numpy() for _, values in inner], axis=1))
        assert rows[-1].shape == (len(x_test), 100)
    assert _max_error(np.concatenate(rows), pairwise) < 1e-6
    for order in (ORDER.DESCENDING, ORDER.ASCENDING):
        ours = list(arnoldi.top_k(test, train, k=4, order=order, d_type=tf.float64, return_indices=True))
        theirs = list(exact.top_k(test, train, k=4, order=order, d_type=tf.float64, return_indices=True))
        for (_, values, _, indices), (_, exact_values, _, exact_indices) in zip(ours, theirs):
            np.testing.assert_array_equal(indices.numpy(), exact_indices.numpy())
            assert _max_error(values, exact_values.numpy()) < 1e-6
        _, values = arnoldi.compute_top_k_from_training_dataset(train, 5, order)
        expected = np.sort(self_influence)[::-1][:5] if order == ORDER.DESCENDING else np.sort(self_influence)[:5]
        assert _max_error(values, expected) < 1e-6


@pytest.mark.parametrize("force_hermitian", [False, True])
def test_shared_api_shapes(force_hermitian):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    y_train = rng.integers(0, 2, size=(10, 1)).astype(np.float32)
    y_test = rng.integers(0, 2, size=(10, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    keras_model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                                    keras.layers.Dense(1, activation="sigmoid")])
    model = InfluenceModel(keras_model, start_layer=0, last_layer=-1,
                           loss_function=keras.losses.BinaryCrossentropy(reduction=None))
    assert model.nb_params == 19
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(5)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(10)
    calculator = ArnoldiInfluenceCalculator(model, train, 12, force_hermitian, 7, seed=0)
    assert tuple(calculator.eig_vals.shape) == (7,) and tuple(calculator.G.shape) == (7, 19)
    eig_vals, g_matrix = calculator.arnoldi(19)
    assert eig_vals.shape == (7,) and g_matrix.shape == (7, 19)
    vectors = [vec for _, vec in calculator.compute_influence_vector(train)]
    assert [tuple(vec.shape) for vec in vectors] == [(5, 7)] * 2
    self_values = [values for _, values in calculator.compute_influence_values(train)]
    assert [tuple(values.shape) for values in self_values] == [(5, 1)] * 2
    assert tuple(calculator._compute_influence_values(train).shape) == (10, 1)  # pylint: disable=W0212
    # Independent check of the projected formula Σ_j (g_t·G_j)(g_z·G_j)/λ_j from per-sample gradients.
    g_train = model.batch_jacobian(train).numpy()
    g_test = model.batch_jacobian(test).numpy()
    g_matrix, eig_vals = calculator.G.numpy(), calculator.eig_vals.numpy()
    expected = (g_test @ g_matrix.T / eig_vals) @ (g_train @ g_matrix.T).T
    matrix = calculator.estimate_influence_values_matrix(test, train).numpy()
    assert matrix.shape == (10, 10)
    np.testing.assert_allclose(matrix, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    for (x_batch, y_batch), inner in calculator.estimate_influence_values_in_batches(test, train,
                                                                                     CACHE.NO_CACHE):
        assert x_batch.shape == (10, 4) and y_batch.shape == (10, 1)
        assert [tuple(values.shape) for _, values in inner] == [(10, 5)] * 2
    samples, values = calculator.compute_top_k_from_training_dataset(train, 3)
    assert tuple(samples.shape) == (3, 4) and tuple(values.shape) == (3,)
    for (x_batch, _), values, top_samples in calculator.top_k(test, train, k=3):
        assert tuple(values.shape) == (10, 3) and tuple(top_samples.shape) == (10, 3, 4)
    first_train, first_test = next(iter(train)), next(iter(test))
    # pylint: disable=protected-access
    assert tuple(calculator._estimate_individual_influence_values_from_batch(first_train, first_test).shape) == (10, 5)


@pytest.mark.parametrize("subspace_dim, k, message", [(11, 3, "exceeds the number of watched parameters"),
                                                      (4, 5, "exceeds subspace_dim")])
def test_invalid_dimensions(regression, subspace_dim, k, message):
    with pytest.raises(ValueError, match=message):
        ArnoldiInfluenceCalculator(regression["model"], regression["train"], subspace_dim, True, k)


def test_rank_agreement_with_exact_first_order_on_digits():
    """Small digits MLP (P = 610, 300 training samples), λ = 0.1: with k = 40 Ritz pairs (subspace 80) the mean
    Spearman correlation per test row with exact first-order values is >= 0.6 (measured 0.75)."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[:340]
    x = (data.data[order] / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.target[order]]
    keras.utils.set_random_seed(0)
    keras_model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="tanh"),
                                    keras.layers.Dense(10)])
    keras_model.compile(keras.optimizers.Adam(1e-2), keras.losses.CategoricalCrossentropy(from_logits=True))
    keras_model.fit(x[:300], y[:300], batch_size=50, epochs=20, verbose=0)
    model = InfluenceModel(keras_model, start_layer=0, last_layer=-1,
                           loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None))
    train = tf.data.Dataset.from_tensor_slices((x[:300], y[:300])).batch(100)
    test = tf.data.Dataset.from_tensor_slices((x[300:], y[300:])).batch(40)
    exact = FirstOrderInfluenceCalculator(model, train, "exact", regularization=0.1)
    arnoldi = ArnoldiInfluenceCalculator(model, train, 80, True, 40, regularization=0.1, seed=0)
    exact_values = exact.estimate_influence_values_matrix(test, train).numpy()
    arnoldi_values = arnoldi.estimate_influence_values_matrix(test, train).numpy()
    spearman = np.mean([spearmanr(a, e).statistic for a, e in zip(arnoldi_values, exact_values)])
    print(f"digits (P = {model.nb_params}): mean Spearman over {len(exact_values)} test rows = {spearman:.3f}")
    assert spearman >= 0.6
