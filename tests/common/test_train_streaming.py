"""Pairwise matrices and top-k streamed over the training set (the test side held, chunked by the memory budget)
against closed-form values of the toy model: g(t)ᵀ H⁻¹ g(z) with the closed-form gradients and Hessian."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import CACHE, ExactIHVP, InfluenceModel
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.utils import ORDER
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_last_layer, toy_mean_hessian_last_layer, toy_model,
                              toy_mse)


@pytest.fixture(name="setup")
def fixture_setup():
    model = toy_model()
    x_train, y_train = toy_data(25, seed=1)
    x_test, y_test = toy_data(7, seed=2)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=toy_mse())
    train, test = toy_dataset(x_train, y_train, 6), toy_dataset(x_test, y_test, 3)
    calculator = FirstOrderInfluenceCalculator(influence_model, train, ExactIHVP(influence_model, train))
    hessian = toy_mean_hessian_last_layer(model, x_train)
    expected = toy_gradients_last_layer(model, x_test, y_test) @ np.linalg.solve(
        hessian, toy_gradients_last_layer(model, x_train, y_train).T)  # (T, N)
    return calculator, train, test, expected, x_train


class SolveCounter:
    """Counts the vectors an IHVP solver is asked to solve."""

    def __init__(self, solver):
        self.solver = solver
        self.columns = 0
        self.original = solver.apply_inverse

    def __call__(self, vectors):
        self.columns += int(vectors.shape[1])
        return self.original(vectors)


@pytest.mark.parametrize("budget", [None, 1])
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_streams_the_training_side_and_solves_the_test_side(setup, budget, order):
    calculator, train, test, expected, x_train = setup
    if budget is not None:
        calculator.memory_budget_bytes = budget  # one test batch per chunk: one training pass each
    counter = SolveCounter(calculator.ihvp_calculator)
    calculator.ihvp_calculator.apply_inverse = counter
    k = 4
    result = list(calculator.top_k(test, train, k=k, order=order, return_indices=True))
    values = np.concatenate([element[1].numpy() for element in result])
    samples = np.concatenate([element[2].numpy() for element in result])
    indices = np.concatenate([element[3].numpy() for element in result])
    ranking = np.argsort(-expected if order == ORDER.DESCENDING else expected, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, ranking)
    np.testing.assert_allclose(values, np.take_along_axis(expected, ranking, 1), rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(samples, x_train[ranking], rtol=1e-6)
    assert [int(element[1].shape[0]) for element in result] == [3, 3, 1]
    assert counter.columns == expected.shape[0]  # only the 7 test gradients were solved, none of the 25 training


def test_influence_matrix_streamed_in_chunks_matches_closed_form(setup):
    calculator, train, test, expected, _ = setup
    calculator.memory_budget_bytes = 1
    matrix = super(FirstOrderInfluenceCalculator, calculator).estimate_influence_values_matrix(test, train)
    np.testing.assert_allclose(matrix.numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_k_larger_than_the_training_set_is_refused(setup):
    calculator, train, test, _, _ = setup
    with pytest.raises(ValueError, match="k=26 is larger than the number of training samples"):
        calculator.top_k(test, train, k=26)


def test_memory_cache_above_the_budget_streams_with_a_warning(setup):
    calculator, train, test, expected, _ = setup
    calculator.memory_budget_bytes = 16  # less than the 25 x 2 floats of the training vectors
    with pytest.warns(ResourceWarning, match="memory_budget_bytes"):
        result = calculator.estimate_influence_values_in_batches(test, train, influence_vector_in_cache=CACHE.MEMORY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        rows = [tf.concat([values for _, values in inner], axis=1) for _, inner in result]
    np.testing.assert_allclose(tf.concat(rows, 0).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("solver", ["cg", "arnoldi"])
def test_solvers_stream_their_hessian_dataset_above_the_budget(setup, solver, monkeypatch):
    """Below the budget the samples (or head inputs) are held; above it every Hessian-vector product streams the
    dataset: the same products and the same solutions."""
    from deel.influenciae.common import ArnoldiIHVP, ConjugateGradientDescentIHVP  # pylint: disable=C0415
    calculator, train, _, _, _ = setup
    model = calculator.model

    def build():
        if solver == "cg":
            return ConjugateGradientDescentIHVP(model, None, train, tol=1e-7, atol=1e-9)
        return ArnoldiIHVP(model, train, subspace_dim=2, k_largest_eig_vals=2, seed=3)

    held = build()
    solver_class = type(held)
    monkeypatch.setattr(solver_class, "memory_budget_bytes", 8)
    streamed = build()
    assert held.hessian_vector_product.samples is not None and streamed.hessian_vector_product.samples is None
    vectors = tf.constant(np.random.default_rng(4).normal(size=(model.nb_params, 3)), model.dtype)
    np.testing.assert_allclose(streamed.apply_hessian(vectors).numpy(), held.apply_hessian(vectors).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(streamed.apply_inverse(vectors).numpy(), held.apply_inverse(vectors).numpy(),
                               rtol=1e-4)
