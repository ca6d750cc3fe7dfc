"""Inverse-Hessian-vector products against float64 numpy solves."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (CGDIHVPFactory, ConjugateGradientDescentIHVP, ConjugateGradientIHVP, ExactIHVP,
                                     ExactIHVPFactory, ForwardOverBackwardHVP, IHVPCalculator, InfluenceModel,
                                     LissaIHVP, LissaIHVPFactory)
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_all_layers, toy_gradients_last_layer,
                              toy_mean_hessian_all_layers, toy_mean_hessian_last_layer, toy_model, toy_mse)


def _relative_error(actual, expected):
    return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


def _toy(dtype="float32", all_layers=False):
    keras_model = toy_model(dtype)
    np_dtype = np.float64 if dtype == "float64" else np.float32
    x, y = toy_data(dtype=np_dtype)
    if all_layers:
        model = InfluenceModel(keras_model, start_layer=0, last_layer=-1, loss_function=toy_mse(dtype))
        gradients = toy_gradients_all_layers(keras_model, x, y)
        hessian = toy_mean_hessian_all_layers(keras_model, x, y)
    else:
        model = InfluenceModel(keras_model, start_layer=-1, loss_function=toy_mse(dtype))
        gradients = toy_gradients_last_layer(keras_model, x, y)
        hessian = toy_mean_hessian_last_layer(keras_model, x)
    return model, toy_dataset(x, y), gradients, hessian


def _ihvp_columns(ihvp, dataset):
    return np.concatenate([block.numpy() for block in ihvp.compute_ihvp(dataset)], axis=1)


@pytest.mark.parametrize("regularization", [0.0, 0.3])
def test_exact_matches_numpy_pinv_and_damped_solve(regularization):
    model, dataset, gradients, hessian = _toy()
    ihvp = ExactIHVP(model, dataset, regularization=regularization)
    np.testing.assert_allclose(ihvp.hessian.numpy(), hessian, rtol=1e-5)
    if regularization:
        expected = np.linalg.solve(hessian + regularization * np.eye(2), gradients.T)
    else:
        expected = np.linalg.pinv(hessian) @ gradients.T
    blocks = list(ihvp.compute_ihvp(dataset))
    assert [tuple(block.shape) for block in blocks] == [(2, 5)] * 5
    assert _relative_error(np.concatenate(blocks, axis=1), expected) < 1e-5
    hvp = np.concatenate([block.numpy() for block in ihvp.compute_hvp(dataset)], axis=1)
    assert _relative_error(hvp, hessian @ gradients.T) < 1e-5


def test_exact_all_layers_float64_indefinite_hessian_uses_pseudo_inverse():
    model, dataset, gradients, hessian = _toy("float64", all_layers=True)
    ihvp = ExactIHVP(model, dataset)
    assert np.linalg.eigvalsh(hessian).min() < 0 < np.linalg.eigvalsh(hessian).max()  # indefinite
    np.testing.assert_allclose(ihvp.hessian.numpy(), hessian, rtol=1e-6, atol=1e-8)
    expected = np.linalg.pinv(hessian, rcond=1e-10) @ gradients.T
    assert _relative_error(_ihvp_columns(ihvp, dataset), expected) < 1e-6


def test_exact_from_given_hessian_and_raw_vectors():
    model, _, _, hessian = _toy()
    ihvp = ExactIHVP(model, train_hessian=hessian)
    vectors = np.random.default_rng(3).normal(size=(7, 2)).astype(np.float32)
    raw = tf.data.Dataset.from_tensor_slices((vectors,)).batch(4)
    result = np.concatenate([block.numpy() for block in ihvp.compute_ihvp(raw, use_gradient=False)], axis=1)
    assert _relative_error(result, np.linalg.solve(hessian, vectors.T)) < 1e-5
    hvp = np.concatenate([block.numpy() for block in ihvp.compute_hvp(raw, use_gradient=False)], axis=1)
    assert _relative_error(hvp, hessian @ vectors.T) < 1e-5


def test_exact_errors():
    model, dataset, _, _ = _toy()
    with pytest.raises(ValueError, match="train_dataset or train_hessian|either"):
        ExactIHVP(model)
    with pytest.raises(ValueError, match="shape"):
        ExactIHVP(model, train_hessian=np.eye(3))
    with pytest.raises(ValueError, match="regularization"):
        ExactIHVP(model, dataset, regularization=-1.0)
    with pytest.raises(ValueError, match="cgd|ConjugateGradient"):
        ExactIHVP(model, dataset, memory_budget_bytes=10)
    with pytest.raises(ValueError, match="batched"):
        ExactIHVP(model, dataset.unbatch().map(lambda x, y: (x[0], y[0, 0])))
    with pytest.raises(ValueError, match="unknown number of batches"):
        ExactIHVP(model, dataset.filter(lambda x, y: True))


def test_too_large_hessian_is_refused_before_allocation():
    keras.utils.set_random_seed(0)
    big = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(40), keras.layers.Dense(2)])
    model = InfluenceModel(big, start_layer=0, loss_function=toy_mse())  # P = 40,040: 38 GB of P×P float64
    data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 1000), np.float32), np.zeros((4, 2), np.float32)))
    with pytest.raises(ValueError, match="GiB"):
        ExactIHVP(model, data.batch(2))


@pytest.mark.parametrize("regularization", [0.0, 0.2])
def test_conjugate_gradients_float64_solves_to_1e_4(regularization):
    model, dataset, gradients, hessian = _toy("float64")
    ihvp = ConjugateGradientDescentIHVP(model, -1, dataset, regularization=regularization, tol=1e-10, atol=0.0)
    expected = np.linalg.solve(hessian + regularization * np.eye(2), gradients.T)
    assert _relative_error(_ihvp_columns(ihvp, dataset), expected) < 1e-4


def test_conjugate_gradients_all_layers_functional_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="float64")
    hidden = keras.layers.Dense(5, activation="tanh", dtype="float64")(inputs)
    outputs = keras.layers.Dense(3, dtype="float64")(keras.layers.Dense(4, activation="tanh", dtype="float64")(hidden))
    keras_model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = InfluenceModel(keras_model, start_layer=2, last_layer=-1, loss_function=toy_mse("float64"))
    exact = ExactIHVP(model, dataset, regularization=0.5)
    cg = ConjugateGradientDescentIHVP(model, None, dataset, regularization=0.5, tol=1e-10, atol=0.0, n_opt_iters=500)
    assert cg.feature_extractor is not None  # the model was cut below the first watched layer
    hessian = exact.hessian.numpy().astype(np.float64)
    gradients = model.batch_jacobian(dataset).numpy()
    expected = np.linalg.solve(hessian + 0.5 * np.eye(model.nb_params), gradients.T)
    assert _relative_error(_ihvp_columns(cg, dataset), expected) < 1e-4
    vectors = rng.normal(size=(model.nb_params, 3))
    np.testing.assert_allclose(ForwardOverBackwardHVP(model, dataset)(vectors).numpy(), hessian @ vectors,
                               rtol=1e-8, atol=1e-10)


def test_iterative_solvers_refuse_watched_weights_below_the_cut():
    model, dataset, _, _ = _toy(all_layers=True)
    with pytest.raises(ValueError, match="below extractor_layer"):
        ConjugateGradientDescentIHVP(model, 1, dataset)


@pytest.mark.parametrize("regularization", [0.0, 0.1])
def test_lissa_within_its_convergence_bound(regularization):
    model, dataset, gradients, hessian = _toy("float64")
    damped = hessian + regularization * np.eye(2)
    eigenvalues = np.linalg.eigvalsh(damped)
    scale, damping, iterations = 1.2 * eigenvalues.max(), 1e-3, 300
    ihvp = LissaIHVP(model, -1, dataset, n_opt_iters=iterations, damping=damping, scale=scale,
                     regularization=regularization)
    fixed_point = np.linalg.solve(damped + damping * scale * np.eye(2), gradients.T)
    contraction = max(abs(1 - damping - eigenvalues / scale))
    # x_n - x* = M^n (x_0 - x*) with ||M|| = contraction, x_0 = v; the result is x_n / scale.
    bound = contraction ** (iterations + 1) * np.abs(gradients.T / scale - fixed_point).max() * 2 + 1e-9
    result = _ihvp_columns(ihvp, dataset)
    assert np.abs(result - fixed_point).max() <= bound + 1e-6 * np.abs(fixed_point).max()
    assert _relative_error(result, np.linalg.solve(damped, gradients.T)) < 0.05
    hvp = np.concatenate([block.numpy() for block in ihvp.compute_hvp(dataset)], axis=1)
    np.testing.assert_allclose(hvp, hessian @ gradients.T, rtol=1e-8)


def test_lissa_argument_errors():
    model, dataset, _, _ = _toy()
    with pytest.raises(ValueError, match="damping"):
        LissaIHVP(model, -1, dataset, damping=1.5)
    with pytest.raises(ValueError, match="scale"):
        LissaIHVP(model, -1, dataset, scale=0.0)
    with pytest.raises(ValueError, match="n_opt_iters"):
        LissaIHVP(model, -1, dataset, n_opt_iters=0)


def test_calculator_enum_and_factories():
    assert IHVPCalculator.from_string("exact") is IHVPCalculator.Exact
    assert IHVPCalculator.from_string("CGD").value is ConjugateGradientDescentIHVP
    assert IHVPCalculator.from_string("lissa").value is LissaIHVP
    assert ConjugateGradientIHVP is ConjugateGradientDescentIHVP
    with pytest.raises(ValueError, match="exact"):
        IHVPCalculator.from_string("newton")
    model, dataset, _, hessian = _toy()
    exact = ExactIHVPFactory(regularization=0.1).build(model, dataset)
    np.testing.assert_allclose(exact.inv_hessian.numpy(), np.linalg.inv(hessian + 0.1 * np.eye(2)), rtol=1e-4)
    cg = CGDIHVPFactory(feature_extractor=-1, n_cgd_iters=7).build(model, dataset)
    assert isinstance(cg, ConjugateGradientDescentIHVP) and cg.n_opt_iters == 7 and cg.extractor_layer == -1
    extractor = keras.Model(model.model.inputs[0], model.model.layers[0].output)
    lissa = LissaIHVPFactory(feature_extractor=extractor, extractor_layer=1, damping=0.01, scale=3.0).build(
        model, dataset)
    assert isinstance(lissa, LissaIHVP) and lissa.feature_extractor is extractor and lissa.scale == 3.0
    with pytest.raises(ValueError, match="extractor_layer"):
        CGDIHVPFactory(feature_extractor=extractor)


def test_exact_damped_indefinite_hessian_falls_back_to_eigendecomposition():
    model, dataset, gradients, hessian = _toy("float64", all_layers=True)
    smallest = np.linalg.eigvalsh(hessian).min()
    assert smallest < 0
    for regularization in (0.5 * abs(smallest), 2.0 * abs(smallest)):  # indefinite, then positive definite
        ihvp = ExactIHVP(model, dataset, regularization=regularization)
        expected = np.linalg.solve(hessian + regularization * np.eye(8), gradients.T)
        assert _relative_error(_ihvp_columns(ihvp, dataset), expected) < 1e-6
        np.testing.assert_allclose(ihvp.eigenvalues.numpy(), np.linalg.eigvalsh(hessian), rtol=1e-6, atol=1e-9)


def _float64_mlp_problem():
    keras.utils.set_random_seed(1)
    keras_model = keras.Sequential([keras.Input((5,), dtype="float64"),
                                    keras.layers.Dense(6, activation="tanh", dtype="float64"),
                                    keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 3))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    model = InfluenceModel(keras_model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    hessian = ExactIHVP(model, dataset).hessian.numpy()
    return model, dataset, hessian, model.batch_jacobian(dataset).numpy().T


def test_block_columnwise_and_recycled_conjugate_gradients_agree_with_the_dense_solve():
    model, dataset, hessian, gradients = _float64_mlp_problem()  # P = 57, 60 right-hand sides
    damping = 0.3 - min(0.0, np.linalg.eigvalsh(hessian).min())  # H + λI positive definite
    expected = np.linalg.solve(hessian + damping * np.eye(model.nb_params), gradients)
    options = dict(regularization=damping, tol=1e-10, atol=0.0, n_opt_iters=500)
    block = ConjugateGradientDescentIHVP(model, None, dataset, **options)
    columnwise = ConjugateGradientDescentIHVP(model, None, dataset, block=False, **options)
    assert block.block and not columnwise.block
    np.testing.assert_allclose(block.apply_inverse(gradients[:, :20]).numpy(), expected[:, :20], rtol=1e-7, atol=1e-9)
    assert block.last_solve_info["operator_columns"] <= 3 * model.nb_params
    np.testing.assert_allclose(columnwise.apply_inverse(gradients[:, :20]).numpy(), expected[:, :20], rtol=1e-7,
                               atol=1e-9)
    recycled = ConjugateGradientDescentIHVP(model, None, dataset, recycle_directions=1000, **options)
    spent = []
    for start in (0, 20, 40):
        np.testing.assert_allclose(recycled.apply_inverse(gradients[:, start:start + 20]).numpy(),
                                   expected[:, start:start + 20], rtol=1e-6, atol=1e-8)
        spent.append(recycled.last_solve_info["operator_columns"])
    assert spent[2] < spent[0] and recycled.krylov_basis.size <= model.nb_params
    # Inside a graph (Dataset.map) block CG runs through tf.py_function, with the same answers.
    block.last_solve_info = None
    np.testing.assert_allclose(_ihvp_columns(block, dataset), expected, rtol=1e-7, atol=1e-9)
    assert block.last_solve_info is not None
    np.testing.assert_allclose(tf.function(block.apply_inverse)(tf.constant(gradients[:, :5])).numpy(),
                               expected[:, :5], rtol=1e-7, atol=1e-9)


def test_conjugate_gradients_option_errors():
    model, dataset, _, _ = _toy()
    with pytest.raises(ValueError, match="recycle_directions"):
        ConjugateGradientDescentIHVP(model, -1, dataset, recycle_directions=-2)
    with pytest.raises(ValueError, match="block=True"):
        ConjugateGradientDescentIHVP(model, -1, dataset, recycle_directions=10, block=False)


@pytest.mark.parametrize("regularization", [0.0, 0.4])
def test_exact_cholesky_solves_quadratic_form_and_lazy_inverse(regularization):
    model, dataset, hessian, gradients = _float64_mlp_problem()
    damping = regularization - min(0.0, np.linalg.eigvalsh(hessian).min()) if regularization else 0.0
    ihvp = ExactIHVP(model, dataset, regularization=damping)
    if damping:
        expected_inverse = np.linalg.inv(hessian + damping * np.eye(model.nb_params))
        assert ihvp.cholesky_factor is not None and ihvp._inverse is None  # pylint: disable=protected-access
        np.testing.assert_allclose(ihvp.cholesky_factor.numpy() @ ihvp.cholesky_factor.numpy().T,
                                   hessian + damping * np.eye(model.nb_params), rtol=1e-10, atol=1e-12)
    else:
        expected_inverse = np.linalg.pinv(hessian, rcond=ihvp.rcond, hermitian=True)
        assert ihvp.cholesky_factor is None
    np.testing.assert_allclose(ihvp.apply_inverse(gradients).numpy(), expected_inverse @ gradients, rtol=1e-6,
                               atol=1e-9)
    quadratic = np.einsum("pk,pq,qk->k", gradients, expected_inverse, gradients)
    np.testing.assert_allclose(ihvp.inverse_quadratic_form(gradients).numpy(), quadratic, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ihvp.inv_hessian.numpy(), expected_inverse, rtol=1e-6, atol=1e-9)
    # Once formed, the explicit inverse is used, with the same answers.
    np.testing.assert_allclose(ihvp.apply_inverse(gradients).numpy(), expected_inverse @ gradients, rtol=1e-6,
                               atol=1e-9)


def test_exact_factor_precision_follows_the_condition_number():
    """float32 models: the damped Hessian is factorised in float32 when well conditioned (estimate × eps small) and
    in float64 otherwise; both answer like a float64 solve to the accuracy their precision allows."""
    from deel.influenciae.utils.linear_algebra import condition_estimate  # pylint: disable=C0415
    model, _, _, _ = _toy(all_layers=True)
    rng = np.random.default_rng(21)
    rotation, _ = np.linalg.qr(rng.normal(size=(model.nb_params, model.nb_params)))
    vectors = rng.normal(size=(model.nb_params, 3))
    for spectrum, expected_dtype, tolerance in ((np.linspace(1.0, 20.0, model.nb_params), tf.float32, 2e-5),
                                                (np.logspace(-5, 1, model.nb_params), tf.float64, 1e-4)):
        hessian = (rotation * spectrum) @ rotation.T
        ihvp = ExactIHVP(model, train_hessian=hessian - 1e-3 * np.eye(model.nb_params), regularization=1e-3)
        assert ihvp.factor_dtype == expected_dtype
        assert ihvp.cholesky_factor.dtype == model.dtype
        solved = ihvp.apply_inverse(vectors.astype(np.float32)).numpy()
        assert _relative_error(solved, np.linalg.solve(hessian, vectors)) < tolerance
        estimate = condition_estimate(tf.constant(hessian), tf.linalg.cholesky(tf.constant(hessian)))
        assert 0.5 * spectrum[-1] / spectrum[0] <= estimate <= 1.0001 * spectrum[-1] / spectrum[0]


def test_default_hvp_chunk_follows_the_input_size():
    """Small inputs: the whole dataset is one chunk; 32 × 32 × 3 images: 2²⁶ / (64 × 3,072) = 341 samples (or the
    first batch if larger); an explicit chunk_size wins."""
    model, dataset, _, _ = _toy()
    size = sum(int(batch[0].shape[0]) for batch in dataset)
    assert ForwardOverBackwardHVP(model, dataset).chunk_size == size
    assert ForwardOverBackwardHVP(model, dataset, chunk_size=3).chunk_size == 3
    keras.utils.set_random_seed(0)
    images = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    image_model = InfluenceModel(images, start_layer=-1, loss_function=toy_mse())
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(700, 32, 32, 3)).astype(np.float32),
                                               rng.normal(size=(700, 2)).astype(np.float32)))
    assert ForwardOverBackwardHVP(image_model, data.batch(100)).chunk_size == 341
    assert ForwardOverBackwardHVP(image_model, data.batch(400)).chunk_size == 400
