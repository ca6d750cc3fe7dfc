"""SecondOrderInfluenceCalculator against a float64 numpy re-derivation of Basu et al. (2020) on the toy model.

Ground truth (SPEC §3.12), with n training samples, a group U of m samples, p = m / n, H the mean Hessian (damped by
λ when regularized) and H_U the summed per-sample Hessian over U (undamped):
``A = H⁻¹ Σ_U g``, ``Π = H⁻¹ H_U A``, ``I = (1 − 2p)/((1 − p)² n) A + 1/((1 − p)² n²) Π``, value ``(Σ_T g)ᵀ I``.
"""
import re

import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import InfluenceModel, LissaIHVP
from deel.influenciae.influence import SecondOrderInfluenceCalculator
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_all_layers, toy_gradients_last_layer,
                              toy_mean_hessian_all_layers, toy_mean_hessian_last_layer, toy_model, toy_mse, toy_weights)

N_TRAIN, GROUP_SIZE = 25, 10


def _basu(group_gradients, group_hessian_sum, inverse, n):
    fraction = len(group_gradients) / n
    additive = inverse @ group_gradients.sum(axis=0)
    pairwise = inverse @ group_hessian_sum @ additive
    vector = ((1 - 2 * fraction) / ((1 - fraction) ** 2 * n) * additive
              + 1.0 / ((1 - fraction) ** 2 * n ** 2) * pairwise)
    return additive, pairwise, vector


@pytest.fixture(name="toy", scope="module")
def fixture_toy():
    keras_model = toy_model("float64")
    x, y = toy_data(n=N_TRAIN, seed=1, dtype=np.float64)
    x_eval, y_eval = toy_data(n=GROUP_SIZE, seed=2, dtype=np.float64)
    return {"keras_model": keras_model, "x": x, "y": y, "train": toy_dataset(x, y, 5),
            "group": toy_dataset(x[:GROUP_SIZE], y[:GROUP_SIZE], 4),  # batches 4, 4, 2
            "evaluate": toy_dataset(x_eval, y_eval, 3), "x_eval": x_eval, "y_eval": y_eval,  # 3, 3, 3, 1
            "model": InfluenceModel(keras_model, start_layer=-1, loss_function=toy_mse("float64"))}


def _last_layer_truth(toy, regularization):
    keras_model, x, y = toy["keras_model"], toy["x"], toy["y"]
    hidden = x[:GROUP_SIZE, 0, :] @ toy_weights(keras_model)[0]
    group_hessian_sum = 2.0 * hidden.T @ hidden  # Σ_U 2 h hᵀ
    hessian = toy_mean_hessian_last_layer(keras_model, x) + regularization * np.eye(2)
    gradients = toy_gradients_last_layer(keras_model, x, y)
    return gradients, _basu(gradients[:GROUP_SIZE], group_hessian_sum, np.linalg.inv(hessian), N_TRAIN)


def _relative(actual, expected):
    return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("regularization", [0.0, 0.3])
def test_terms_vector_and_values_match_basu(toy, regularization):
    calculator = SecondOrderInfluenceCalculator(toy["model"], toy["train"], "exact", regularization=regularization)
    assert calculator.train_size == N_TRAIN
    gradients, (additive, pairwise, vector) = _last_layer_truth(toy, regularization)
    # pylint: disable=protected-access
    computed_additive = calculator._compute_additive_term(toy["group"])
    assert tuple(computed_additive.shape) == (2, 1)
    assert _relative(computed_additive[:, 0], additive) < 1e-10
    computed_pairwise = calculator._compute_pairwise_interactions(toy["group"], computed_additive)
    assert tuple(computed_pairwise.shape) == (2, 1)
    assert _relative(computed_pairwise[:, 0], pairwise) < 1e-10
    group_vector = calculator.compute_influence_vector_group(toy["group"])
    assert tuple(group_vector.shape) == (1, 2)
    assert _relative(group_vector[0], vector) < 1e-10
    self_value = calculator.estimate_influence_values_group(toy["group"])
    assert tuple(self_value.shape) == (1, 1)
    assert _relative(self_value[0, 0], gradients[:GROUP_SIZE].sum(axis=0) @ vector) < 1e-10
    eval_gradients = toy_gradients_last_layer(toy["keras_model"], toy["x_eval"], toy["y_eval"])
    value = calculator.estimate_influence_values_group(toy["group"], toy["evaluate"])
    assert tuple(value.shape) == (1, 1)
    assert _relative(value[0, 0], eval_gradients.sum(axis=0) @ vector) < 1e-10


def test_all_layers_with_an_indefinite_hessian():
    keras_model = toy_model("float64")
    x, y = toy_data(n=N_TRAIN, seed=1, dtype=np.float64)
    model = InfluenceModel(keras_model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    calculator = SecondOrderInfluenceCalculator(model, toy_dataset(x, y, 5))
    hessian = toy_mean_hessian_all_layers(keras_model, x, y)
    group_hessian_sum = GROUP_SIZE * toy_mean_hessian_all_layers(keras_model, x[:GROUP_SIZE], y[:GROUP_SIZE])
    gradients = toy_gradients_all_layers(keras_model, x, y)
    _, _, vector = _basu(gradients[:GROUP_SIZE], group_hessian_sum, np.linalg.pinv(hessian, rcond=1e-10), N_TRAIN)
    group = toy_dataset(x[:GROUP_SIZE], y[:GROUP_SIZE], 4)
    computed = calculator.compute_influence_vector_group(group)
    assert tuple(computed.shape) == (1, 8)
    assert _relative(computed[0], vector) < 1e-5


def test_iterative_solvers_pass_the_regularization(toy):
    regularization = 0.3
    gradients, (_, _, vector) = _last_layer_truth(toy, regularization)
    top = np.linalg.eigvalsh(toy_mean_hessian_last_layer(toy["keras_model"], toy["x"])).max() + regularization
    lissa = LissaIHVP(toy["model"], None, toy["train"], n_opt_iters=400, damping=0.0, scale=1.2 * top,
                      regularization=regularization)
    for solver, tolerance in (("cgd", 1e-3), (lissa, 1e-3)):
        calculator = SecondOrderInfluenceCalculator(toy["model"], toy["train"], solver, regularization=regularization)
        assert _relative(calculator.compute_influence_vector_group(toy["group"])[0], vector) < tolerance
        value = calculator.estimate_influence_values_group(toy["group"])
        assert _relative(value[0, 0], gradients[:GROUP_SIZE].sum(axis=0) @ vector) < tolerance


def test_group_errors(toy):
    calculator = SecondOrderInfluenceCalculator(toy["model"], toy["train"])
    with pytest.raises(ValueError, match="must match"):
        calculator.estimate_influence_values_group(toy["group"], toy["evaluate"].take(2))
    with pytest.raises(ValueError, match="as many as or more than the training set"):
        calculator.compute_influence_vector_group(toy["train"])
    with pytest.raises(ValueError, match=re.escape("p = |U|/n = 1 >= 1")):
        calculator.estimate_influence_values_group(toy["train"])
    with pytest.raises(ValueError, match="empty"):
        calculator.compute_influence_vector_group(toy["group"].take(0))
    # A group in a single batch works too.
    assert np.all(np.isfinite(calculator.compute_influence_vector_group(
        tf.data.Dataset.from_tensor_slices((toy["x"][:3], toy["y"][:3])).batch(3)).numpy()))
