"""SampleBoundaryCalculator (DeepFool in input space) against closed forms and against one-sample runs."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae import boundary
from deel.influenciae.boundary_based import SampleBoundaryCalculator
from deel.influenciae.utils import ORDER
from tests.assertions import assert_top_k_from_training_dataset


def spec_model() -> keras.Model:
    """SPEC §3.16 model: Dense(2), kernel [[1, 1], [1, 0], [0, 0]], bias [4, 0]."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.layers[0].set_weights([np.array([[1., 1.], [1., 0.], [0., 0.]], np.float32), np.array([4., 0.], np.float32)])
    return model


def linear_model(n_features: int, n_classes: int, seed: int):
    """Dense(n_classes) with random weights; returns the model and (W (d, C), b (C,)) in float64."""
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(n_features, n_classes)), rng.normal(size=n_classes)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(n_classes)])
    model.layers[0].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model, kernel, bias


def mlp(seed: int = 0, n_features: int = 4, n_classes: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(n_classes)])


def dataset(x: np.ndarray, batch_size: int) -> tf.data.Dataset:
    labels = np.zeros(len(x), np.int64)  # ignored by the method
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32), labels)).batch(batch_size)


def values_of(calculator, x: np.ndarray, batch_size: int) -> np.ndarray:
    return calculator._compute_influence_values(dataset(x, batch_size)).numpy()  # pylint: disable=W0212


def test_spec_value_and_shape():
    calculator = SampleBoundaryCalculator(spec_model())
    batches = [values.numpy() for _, values in calculator.compute_influence_values(dataset(np.zeros((10, 3)), 5))]
    assert [values.shape for values in batches] == [(5, 1), (5, 1)]
    np.testing.assert_allclose(np.concatenate(batches), -4.0, atol=1e-6)
    assert boundary.SampleBoundaryCalculator is SampleBoundaryCalculator


@pytest.mark.parametrize("n_classes", [2, 4])
def test_linear_model_closed_form(n_classes):
    # For f(x) = Wᵀx + b one DeepFool step lands on the nearest pairwise boundary:
    # distance = min_{k ≠ c0} |f_c0 − f_k| / ‖w_c0 − w_k‖ (for two classes: |f_0 − f_1| / ‖w_0 − w_1‖).
    model, kernel, bias = linear_model(5, n_classes, seed=n_classes)
    x = np.random.default_rng(10 + n_classes).normal(size=(12, 5))
    scores = x @ kernel + bias
    origin = scores.argmax(axis=1)
    expected = np.full(len(x), np.inf)
    for k in range(n_classes):
        gap = np.abs(scores[np.arange(len(x)), origin] - scores[:, k])
        norm = np.linalg.norm(kernel[:, origin] - kernel[:, [k]], axis=0)
        expected = np.where(origin == k, expected, np.minimum(expected, gap / np.where(origin == k, 1., norm)))
    values = values_of(SampleBoundaryCalculator(model), x, batch_size=5)  # batches 5, 5, 2
    assert values.shape == (12, 1)
    np.testing.assert_allclose(values[:, 0], -expected, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_by_one_and_reaches_boundary():
    model = mlp()
    x = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32) * 2
    calculator = SampleBoundaryCalculator(model, step_nbr=50)
    batched = values_of(calculator, x, batch_size=16)
    one_by_one = values_of(calculator, x, batch_size=1)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)
    assert np.all(batched < 0)
    # Where DeepFool stops, the prediction has flipped or the two best scores tie.
    adversarial = calculator.compute_adversarial_examples(x).numpy()
    before, after = model(x).numpy(), model(adversarial).numpy()
    top2 = np.sort(after, axis=1)[:, -2:]
    assert np.all((after.argmax(1) != before.argmax(1)) | (top2[:, 1] - top2[:, 0] < 1e-3))
    np.testing.assert_allclose(np.linalg.norm(adversarial - x, axis=1), -batched[:, 0], rtol=1e-5)


def test_step_limit_and_weights_untouched():
    model = mlp(seed=1)
    weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    one_step = values_of(SampleBoundaryCalculator(model, step_nbr=1), x, 6)[:, 0]
    # One step is the linearised distance min_k |Δf_k| / ‖w_k‖ at x, computed here with an independent tape.
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        scores = model(inputs)
    jacobian = tape.batch_jacobian(scores, inputs).numpy()
    scores = scores.numpy()
    expected = []
    for i in range(len(x)):
        c0 = scores[i].argmax()
        expected.append(min(abs(scores[i, c0] - scores[i, k]) / np.linalg.norm(jacobian[i, k] - jacobian[i, c0])
                            for k in range(scores.shape[1]) if k != c0))
    np.testing.assert_allclose(-one_step, expected, rtol=1e-4)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_from_training_dataset(order):
    model, _, _ = linear_model(3, 3, seed=7)
    x = np.random.default_rng(8).normal(size=(11, 3)).astype(np.float32)
    calculator = SampleBoundaryCalculator(model)
    values = values_of(calculator, x, 4)[:, 0]
    assert_top_k_from_training_dataset(calculator, dataset(x, 4), x, values, 4, order)


def test_bad_arguments():
    single_output = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="at least 2"):
        SampleBoundaryCalculator(single_output)
    with pytest.raises(ValueError, match="step_nbr"):
        SampleBoundaryCalculator(spec_model(), step_nbr=0)
    with pytest.raises(TypeError):
        SampleBoundaryCalculator("not a model")


def test_integer_images_on_a_cnn():
    keras.utils.set_random_seed(5)
    cnn = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
                            keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dense(3)])
    images = np.random.default_rng(6).integers(0, 255, size=(5, 6, 6, 1)).astype(np.uint8)
    labels = np.zeros(5, np.int64)
    calculator = SampleBoundaryCalculator(cnn, step_nbr=20)
    batched = calculator._compute_influence_values(  # pylint: disable=W0212
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)).numpy()
    one_by_one = calculator._compute_influence_values(  # pylint: disable=W0212
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(1)).numpy()
    assert batched.shape == (5, 1)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4)
