"""FirstOrderInfluenceCalculator: every generic method against g_tᵀ H⁺ g_z computed in float64 numpy."""
import os

import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (CACHE, ConjugateGradientDescentIHVP, ExactIHVP, IHVPCalculator, InfluenceModel,
                                     LissaIHVP)
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.utils import ORDER
from tests.assertions import assert_close_to_max as _close
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_last_layer, toy_mean_hessian_last_layer,
                              toy_model, toy_mse)


@pytest.fixture(name="setup", scope="module")
def fixture_setup():
    keras_model = toy_model()
    model = InfluenceModel(keras_model, start_layer=-1, loss_function=toy_mse())
    x_train, y_train = toy_data(n=25, seed=1)
    x_test, y_test = toy_data(n=12, seed=2)
    train = toy_dataset(x_train, y_train, 5)
    test = toy_dataset(x_test, y_test, 5)  # batches of 5, 5, 2: a short last batch
    hessian_inverse = np.linalg.pinv(toy_mean_hessian_last_layer(keras_model, x_train))
    g_train = toy_gradients_last_layer(keras_model, x_train, y_train)
    g_test = toy_gradients_last_layer(keras_model, x_test, y_test)
    return {"model": model, "train": train, "test": test, "x_train": x_train, "x_test": x_test,
            "calculator": FirstOrderInfluenceCalculator(model, train, ExactIHVP(model, train)),
            "vectors": g_train @ hessian_inverse, "pairwise": g_test @ hessian_inverse @ g_train.T,
            "self": np.einsum("ip,pq,iq->i", g_train, hessian_inverse, g_train)}


def test_influence_vectors_and_values(setup):
    calculator = setup["calculator"]
    vectors = [(batch, vec.numpy()) for batch, vec in calculator.compute_influence_vector(setup["train"])]
    assert len(vectors) == 5
    _close(np.concatenate([vec for _, vec in vectors]), setup["vectors"])
    _close(calculator.estimate_influence_values_matrix(setup["test"], setup["train"]), setup["pairwise"])
    _close(calculator._compute_influence_values(setup["train"])[:, 0], setup["self"])  # pylint: disable=W0212
    per_batch = [values.numpy() for _, values in calculator.compute_influence_values(setup["train"])]
    assert [v.shape for v in per_batch] == [(5, 1)] * 5
    first_train, first_test = next(iter(setup["train"])), next(iter(setup["test"]))
    # pylint: disable=protected-access
    _close(calculator._estimate_individual_influence_values_from_batch(first_train, first_test),
           setup["pairwise"][:5, :5])


def test_save_and_load_influence_vectors(setup, tmp_path):
    calculator = setup["calculator"]
    path = str(tmp_path / "vectors")
    list(calculator.compute_influence_vector(setup["train"], save_influence_vector_ds_path=path))
    loaded = np.stack([v.numpy() for v in tf.data.Dataset.load(path)])
    _close(loaded, setup["vectors"])


@pytest.mark.parametrize("cache", [CACHE.MEMORY, CACHE.DISK, CACHE.NO_CACHE])
def test_values_in_batches_with_every_cache_mode(setup, tmp_path, cache):
    calculator = setup["calculator"]
    load_path = None
    if cache == CACHE.DISK:
        load_path = str(tmp_path / "saved")
        calculator.compute_influence_vector(setup["train"], save_influence_vector_ds_path=load_path)
    value_path = str(tmp_path / "values")
    result = calculator.estimate_influence_values_in_batches(
        setup["test"], setup["train"], influence_vector_in_cache=cache, load_influence_vector_path=load_path,
        save_influence_value_path=value_path)
    rows = []
    for (x_test, _), inner in result:
        blocks = [(x_train.numpy(), values.numpy()) for (x_train, _), values in inner]
        assert [b[1].shape for b in blocks] == [(len(x_test), 5)] * 5
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), setup["x_train"])
        rows.append(np.concatenate([b[1] for b in blocks], axis=1))
    _close(np.concatenate(rows), setup["pairwise"])
    assert sorted(os.listdir(value_path)) == ["batch_000000", "batch_000001", "batch_000002"]
    saved = np.concatenate([v.numpy() for _, v in tf.data.Dataset.load(os.path.join(value_path, "batch_000002"))],
                           axis=1)
    _close(saved, setup["pairwise"][10:])


def test_disk_cache_without_saved_vectors_fails_clearly(setup, tmp_path):
    with pytest.raises(FileNotFoundError):
        setup["calculator"].estimate_influence_values_in_batches(
            setup["test"], setup["train"], influence_vector_in_cache=CACHE.DISK,
            load_influence_vector_path=str(tmp_path / "nothing"))


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
@pytest.mark.parametrize("cache", [CACHE.MEMORY, CACHE.NO_CACHE])
def test_top_k_with_short_last_batch_and_indices(setup, order, cache):
    calculator = setup["calculator"]
    k = 4
    sign = -1 if order == ORDER.DESCENDING else 1
    expected_indices = np.argsort(sign * setup["pairwise"], axis=1, kind="stable")[:, :k]
    values, samples, indices = [], [], []
    for (x_test, _), top_values, top_samples, top_indices in calculator.top_k(
            setup["test"], setup["train"], k=k, order=order, influence_vector_in_cache=cache, return_indices=True):
        assert top_values.shape == (len(x_test), k) and top_samples.shape == (len(x_test), k, 1, 3)
        values.append(top_values.numpy())
        samples.append(top_samples.numpy())
        indices.append(top_indices.numpy())
    indices = np.concatenate(indices)
    np.testing.assert_array_equal(indices, expected_indices)
    _close(np.concatenate(values), np.take_along_axis(setup["pairwise"], expected_indices, axis=1))
    np.testing.assert_array_equal(np.concatenate(samples), setup["x_train"][expected_indices])
    plain = next(iter(calculator.top_k(setup["test"], setup["train"], k=k, order=order)))
    assert len(plain) == 3
    positional = next(iter(calculator.top_k(setup["test"], setup["train"], k, order)))  # README form
    np.testing.assert_array_equal(positional[1].numpy(), plain[1].numpy())
    np.testing.assert_allclose(positional[1].numpy(), np.concatenate(values)[:5], rtol=1e-5)


def test_top_k_save_and_errors(setup, tmp_path):
    calculator = setup["calculator"]
    path = str(tmp_path / "topk")
    calculator.top_k(setup["test"], setup["train"], k=2, save_top_k_ds_path=path)
    saved = [values.numpy() for _, values, _ in tf.data.Dataset.load(path)]
    _close(np.concatenate(saved), -np.sort(-setup["pairwise"], axis=1)[:, :2])
    with pytest.raises(ValueError, match="k must be"):
        calculator.top_k(setup["test"], setup["train"], k=0)
    with pytest.raises(ValueError, match="larger than the number of training samples"):
        calculator.top_k(setup["test"], setup["train"], k=26)
    with pytest.raises(ValueError, match="batched"):
        calculator.top_k(setup["test"].unbatch().map(lambda x, y: (x[0], y[0, 0])), setup["train"], k=2)


def test_top_k_ties_keep_the_earlier_training_sample(setup):
    model = setup["model"]
    x_train, y_train = toy_data(n=6, seed=1)
    duplicated = toy_dataset(np.repeat(x_train, 2, axis=0), np.repeat(y_train, 2, axis=0), 4)
    calculator = FirstOrderInfluenceCalculator(model, duplicated, ExactIHVP(model, duplicated))
    for _, values, _, indices in calculator.top_k(toy_dataset(x_train, y_train, 3), duplicated, k=4,
                                                  return_indices=True):
        pairs = indices.numpy()
        assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] == pairs[:, 0] + 1).all()
        np.testing.assert_allclose(values.numpy()[:, 0], values.numpy()[:, 1], rtol=1e-6)


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_from_training_dataset(setup, order):
    sign = -1 if order == ORDER.DESCENDING else 1
    expected = np.argsort(sign * setup["self"], kind="stable")[:3]
    samples, values, indices = setup["calculator"].compute_top_k_from_training_dataset(
        setup["train"], 3, order, return_indices=True)
    np.testing.assert_array_equal(indices.numpy(), expected)
    _close(values.numpy(), setup["self"][expected])
    np.testing.assert_array_equal(samples.numpy(), setup["x_train"][expected])
    assert len(setup["calculator"].compute_top_k_from_training_dataset(setup["train"], 3, order)) == 2
    with pytest.raises(ValueError, match="larger than"):
        setup["calculator"].compute_top_k_from_training_dataset(setup["train"], 30)


def test_relatif_normalisation(setup):
    model, train = setup["model"], setup["train"]
    calculator = FirstOrderInfluenceCalculator(model, train, "exact", normalize=True)
    norms = np.linalg.norm(setup["vectors"], axis=1)
    _close(np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train)]),
           setup["vectors"] / norms[:, None])
    _close(calculator.estimate_influence_values_matrix(setup["test"], train), setup["pairwise"] / norms[None, :])
    _close(calculator._compute_influence_values(train)[:, 0], setup["self"] / norms)  # pylint: disable=W0212


def test_group_influence(setup):
    model, train, calculator = setup["model"], setup["train"], setup["calculator"]
    group_train, group_test = train.take(2), setup["test"].take(2)
    g_sum = setup["vectors"][:10].sum(axis=0)  # H⁺ Σ g(z) = Σ H⁺ g(z)
    _close(calculator.compute_influence_vector_group(group_train).numpy(), g_sum[None, :])
    expected = setup["pairwise"][:10, :10].sum()
    _close(calculator.estimate_influence_values_group(group_train, group_test).numpy(), np.array([[expected]]))
    _close(calculator.estimate_influence_values_group(group_train).numpy(), np.array([[_self_group(setup)]]))
    relatif = FirstOrderInfluenceCalculator(model, train, "exact", normalize=True)
    _close(relatif.compute_influence_vector_group(group_train).numpy(), (g_sum / np.linalg.norm(g_sum))[None, :])
    with pytest.raises(ValueError, match="must match"):
        calculator.estimate_influence_values_group(group_train, setup["test"].take(1))


def _self_group(setup):
    keras_model = setup["model"].model
    x_train, y_train = toy_data(n=25, seed=1)
    g = toy_gradients_last_layer(keras_model, x_train, y_train)[:10].sum(axis=0)
    return g @ np.linalg.pinv(toy_mean_hessian_last_layer(keras_model, x_train)) @ g


def test_solver_resolution_and_regularization(setup):
    model, train = setup["model"], setup["train"]
    assert isinstance(FirstOrderInfluenceCalculator(model, train, "exact").ihvp_calculator, ExactIHVP)
    assert isinstance(FirstOrderInfluenceCalculator(model, train, "cgd").ihvp_calculator,
                      ConjugateGradientDescentIHVP)
    assert isinstance(FirstOrderInfluenceCalculator(model, train, IHVPCalculator.Lissa).ihvp_calculator, LissaIHVP)
    assert isinstance(FirstOrderInfluenceCalculator(model, train, ExactIHVP).ihvp_calculator, ExactIHVP)
    damped = FirstOrderInfluenceCalculator(model, train, "exact", regularization=0.5)
    x_train, y_train = toy_data(n=25, seed=1)
    hessian = toy_mean_hessian_last_layer(model.model, x_train)
    g = toy_gradients_last_layer(model.model, x_train, y_train)
    _close(damped._compute_influence_values(train)[:, 0],  # pylint: disable=W0212
           np.einsum("ip,pq,iq->i", g, np.linalg.inv(hessian + 0.5 * np.eye(2)), g))
    with pytest.raises(TypeError, match="ihvp_calculator"):
        FirstOrderInfluenceCalculator(model, train, 3)
    with pytest.raises(ValueError, match="exact"):
        FirstOrderInfluenceCalculator(model, train, "newton")
    with pytest.raises(ValueError, match="batched"):
        FirstOrderInfluenceCalculator(model, train.unbatch().map(lambda x, y: (x[0], y[0, 0])))


def test_hessian_on_a_random_subset(setup):
    model, train = setup["model"], setup["train"]
    calculator = FirstOrderInfluenceCalculator(model, train, "exact", n_samples_for_hessian=10, seed=3)
    subset = list(calculator.train_set.unbatch())
    assert len(subset) == 10
    x_subset = np.stack([x.numpy() for x, _ in subset])
    expected = toy_mean_hessian_last_layer(model.model, x_subset)
    _close(calculator.ihvp_calculator.hessian.numpy(), expected, 1e-5)
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        FirstOrderInfluenceCalculator(model, train, "exact", n_samples_for_hessian=0)


def test_cg_calculator_matches_exact_values(setup):
    model, train = setup["model"], setup["train"]
    calculator = FirstOrderInfluenceCalculator(
        model, train, ConjugateGradientDescentIHVP(model, -1, train, tol=1e-8, atol=0.0))
    _close(calculator.estimate_influence_values_matrix(setup["test"], train), setup["pairwise"], 1e-3)


def test_matrix_solves_on_the_smaller_side_with_the_same_values(setup):
    calculator = setup["calculator"]
    # 25 samples to evaluate against 12 training samples: the solver is applied to the training side.
    _close(calculator.estimate_influence_values_matrix(setup["train"], setup["test"]), setup["pairwise"].T)
    _close(calculator.estimate_influence_values_matrix(setup["test"], setup["train"]), setup["pairwise"])
    # The solver sees the smaller side only; equal sizes solve the test side; an empty training set is refused.
    seen = []
    ihvp = calculator.ihvp_calculator
    original = ihvp.apply_inverse
    ihvp.apply_inverse = lambda vectors: seen.append(int(vectors.shape[1])) or original(vectors)
    try:
        calculator.estimate_influence_values_matrix(setup["train"], setup["test"])
        calculator.estimate_influence_values_matrix(setup["test"], setup["train"])
        calculator.estimate_influence_values_matrix(setup["test"], setup["test"])
        with pytest.raises(ValueError, match="train_set is empty"):
            calculator.estimate_influence_values_matrix(setup["test"], setup["train"].take(0))
    finally:
        del ihvp.apply_inverse
    assert seen == [12, 12, 12]
