"""WeightsBoundaryCalculator (DeepFool in weight space) against closed forms; the model is never altered."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae import boundary
from deel.influenciae.boundary_based import WeightsBoundaryCalculator
from deel.influenciae.utils import ORDER
from tests.assertions import assert_top_k_from_training_dataset
from tests.boundary_based.test_sample_boundary import dataset, linear_model, mlp, spec_model, values_of


class GuardedDense(keras.layers.Dense):
    """Dense layer that fails at run time once its first bias has moved below 3 (a mid-loop exception)."""

    def call(self, inputs):
        check = tf.debugging.assert_greater(self.bias[0], tf.constant(3., self.bias.dtype), message="bias moved")
        with tf.control_dependencies([check]):
            return super().call(inputs)


def assert_same_weights(before, model):
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_spec_value_shape_and_weights_kept():
    model = spec_model()
    weights = [w.copy() for w in model.get_weights()]
    calculator = WeightsBoundaryCalculator(model)
    batches = [values.numpy() for _, values in calculator.compute_influence_values(dataset(np.zeros((10, 3)), 5))]
    assert [values.shape for values in batches] == [(5, 1), (5, 1)]
    # Only the bias moves, (4, 0) -> (2, 2).
    np.testing.assert_allclose(np.concatenate(batches), -2 * np.sqrt(2), atol=1e-6)
    assert_same_weights(weights, model)
    assert boundary.WeightsBoundaryCalculator is WeightsBoundaryCalculator


@pytest.mark.parametrize("norm_type", [1, 2, 3])
def test_linear_model_closed_form(norm_type):
    # f_k = x·W[:, k] + b_k is linear in θ = (W, b): ∇_θ(f_k − f_c0) = w has x in column k, −x in column c0 and
    # ±1 on the biases, so ‖w‖_p is the same for every k, k* is the runner-up class and one step is exact:
    # distance = ‖r |w|^(p−1)‖_p with r = Δf / ‖w‖_p^p.
    model, kernel, bias = linear_model(4, 3, seed=norm_type)
    x = np.random.default_rng(20 + norm_type).normal(size=(7, 4))
    scores = x @ kernel + bias
    top2 = np.sort(scores, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    w_abs = np.concatenate([np.abs(x), np.abs(x), np.ones((len(x), 2))], axis=1)  # non-zero entries of |w|
    rate = gap / np.sum(w_abs ** norm_type, axis=1)
    expected = rate * np.sum(w_abs ** (norm_type * (norm_type - 1)), axis=1) ** (1 / norm_type)
    values = values_of(WeightsBoundaryCalculator(model, norm_type=norm_type), x, batch_size=3)
    assert values.shape == (7, 1)
    np.testing.assert_allclose(values[:, 0], -expected, rtol=1e-4, atol=1e-6)


def test_batch_equals_one_by_one():
    model = mlp(seed=2)
    weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32)
    calculator = WeightsBoundaryCalculator(model, step_nbr=20)
    batched = values_of(calculator, x, batch_size=6)
    np.testing.assert_allclose(batched, values_of(calculator, x, batch_size=1), rtol=1e-4, atol=1e-6)
    assert np.all(batched < 0)
    assert_same_weights(weights, model)


def test_weights_kept_when_an_exception_is_raised_mid_loop():
    model = keras.Sequential([keras.Input((3,)), GuardedDense(2)])
    model.layers[0].set_weights([np.array([[1., 1.], [1., 0.], [0., 0.]], np.float32),
                                 np.array([4., 0.], np.float32)])
    weights = [w.copy() for w in model.get_weights()]
    calculator = WeightsBoundaryCalculator(model)
    # The first DeepFool step moves the bias to (2, 2); evaluating the next step trips the guard.
    with pytest.raises(tf.errors.InvalidArgumentError, match="bias moved"):
        values_of(calculator, np.zeros((4, 3)), 2)
    assert_same_weights(weights, model)


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_from_training_dataset(order):
    model, _, _ = linear_model(3, 2, seed=9)
    x = np.random.default_rng(11).normal(size=(9, 3)).astype(np.float32)
    calculator = WeightsBoundaryCalculator(model)
    values = values_of(calculator, x, 4)[:, 0]
    assert_top_k_from_training_dataset(calculator, dataset(x, 4), x, values, 3, order)


class Subclassed(keras.Model):
    """A subclassed model whose ``call`` takes no ``training`` argument."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):  # pylint: disable=arguments-differ
        return self.dense(inputs)


def test_subclassed_model_without_training_argument():
    model = Subclassed()
    model(tf.zeros((1, 3)))
    model.dense.set_weights([np.array([[1., 1.], [1., 0.], [0., 0.]], np.float32), np.array([4., 0.], np.float32)])
    values = values_of(WeightsBoundaryCalculator(model), np.zeros((3, 3)), 3)
    np.testing.assert_allclose(values, -2 * np.sqrt(2), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm_type"):
        WeightsBoundaryCalculator(spec_model(), norm_type=0.5)
    with pytest.raises(ValueError, match="norm_type"):
        WeightsBoundaryCalculator(spec_model(), norm_type=np.inf)
    with pytest.raises(ValueError, match="at least 2"):
        WeightsBoundaryCalculator(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
