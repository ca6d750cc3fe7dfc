"""InfluenceModel: loss checks, layer selection, per-sample derivatives against closed forms."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, InfluenceModel
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_all_layers, toy_gradients_last_layer,
                              toy_mean_hessian_all_layers, toy_mean_hessian_last_layer, toy_model, toy_mse,
                              toy_weights)


@pytest.mark.parametrize("loss", [keras.losses.MeanAbsoluteError(reduction="sum"),
                                  keras.losses.CategoricalCrossentropy(reduction="sum_over_batch_size"),
                                  keras.losses.MeanSquaredError()])
def test_reduced_losses_are_rejected(loss):
    with pytest.raises(ValueError, match="reduction"):
        InfluenceModel(toy_model(), loss_function=loss)


@pytest.mark.parametrize("loss", [keras.losses.MeanAbsoluteError(reduction=None),
                                  keras.losses.MeanSquaredError(reduction="none"),
                                  keras.losses.CategoricalCrossentropy(reduction=None),
                                  keras.losses.CosineSimilarity(reduction=None),
                                  lambda y_true, y_pred, _=None: (y_true - y_pred) ** 2])
def test_unreduced_losses_are_accepted(loss):
    assert InfluenceModel(toy_model(), start_layer=-1, loss_function=loss).nb_params == 2


def test_bad_arguments():
    with pytest.raises(TypeError, match="loss_function"):
        InfluenceModel(toy_model(), loss_function="mse")
    with pytest.raises(TypeError, match="keras.Model"):
        InfluenceModel(object())
    with pytest.raises(TypeError, match="start_layer"):
        InfluenceModel(toy_model(), start_layer=1.5)


def test_loss_reducing_over_the_batch_is_caught_when_used():
    model = InfluenceModel(toy_model(), start_layer=-1, loss_function=lambda y_true, y_pred: tf.reduce_mean(
        (y_true - y_pred) ** 2))
    x, y = toy_data()
    with pytest.raises(ValueError, match="one loss per"):
        model.batch_loss(toy_dataset(x, y))


def test_losses_gradients_and_hessian_match_closed_forms():
    keras_model = toy_model()
    model = InfluenceModel(keras_model, start_layer=-1, loss_function=toy_mse())
    x, y = toy_data()
    dataset = toy_dataset(x, y)
    w1, w2 = toy_weights(keras_model)
    expected_losses = ((x[:, 0, :] @ w1 @ w2 - y[:, 0, :]) ** 2)[:, 0]
    np.testing.assert_allclose(model.batch_loss(dataset).numpy(), expected_losses, rtol=1e-5)
    expected = toy_gradients_last_layer(keras_model, x, y)
    np.testing.assert_allclose(model.batch_jacobian(dataset).numpy(), expected, rtol=1e-5, atol=1e-6)
    per_batch = expected.reshape(5, 5, 2).sum(axis=1)
    np.testing.assert_allclose(model.batch_gradient(dataset).numpy(), per_batch, rtol=1e-5, atol=1e-6)
    hessian = sum(model.batch_hessian_tensor(batch) for batch in dataset).numpy() / len(x)
    np.testing.assert_allclose(hessian, toy_mean_hessian_last_layer(keras_model, x), rtol=1e-5)
    vectors = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    hvp = sum(model.batch_hvp_tensor(batch, vectors) for batch in dataset).numpy() / len(x)
    np.testing.assert_allclose(hvp, toy_mean_hessian_last_layer(keras_model, x) @ vectors, rtol=1e-4, atol=1e-6)


def test_all_layers_float64_gradients_and_hessian():
    keras_model = toy_model("float64")
    model = InfluenceModel(keras_model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    x, y = toy_data(dtype=np.float64)
    dataset = toy_dataset(x, y)
    assert model.nb_params == 8
    np.testing.assert_allclose(model.batch_jacobian(dataset).numpy(), toy_gradients_all_layers(keras_model, x, y),
                               rtol=1e-10, atol=1e-12)
    hessian = sum(model.batch_hessian_tensor(batch) for batch in dataset).numpy() / len(x)
    np.testing.assert_allclose(hessian, toy_mean_hessian_all_layers(keras_model, x, y), rtol=1e-5, atol=1e-7)


def test_per_sample_gradients_do_not_depend_on_batching():
    keras_model = toy_model()
    model = InfluenceModel(keras_model, start_layer=0, last_layer=1, loss_function=toy_mse())
    x, y = toy_data(n=9)
    by_three = model.batch_jacobian(toy_dataset(x, y, 3)).numpy()
    by_one = model.batch_jacobian(toy_dataset(x, y, 1)).numpy()
    np.testing.assert_allclose(by_three, by_one, rtol=1e-6, atol=1e-7)


def test_sample_weights_scale_gradients():
    keras_model = toy_model()
    model = InfluenceModel(keras_model, start_layer=-1, loss_function=toy_mse())
    x, y = toy_data(n=10)
    weights = np.linspace(0.5, 2.0, 10).astype(np.float32)
    weighted = model.batch_jacobian(tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(4)).numpy()
    expected = toy_gradients_last_layer(keras_model, x, y) * weights[:, None]
    np.testing.assert_allclose(weighted, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_gradients_raise():
    model = InfluenceModel(toy_model(), start_layer=-1, loss_function=toy_mse())
    x, y = toy_data(n=4)
    x[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Non-finite"):
        model.batch_jacobian(toy_dataset(x, y, 2))


def test_unbatched_dataset_is_rejected():
    model = InfluenceModel(toy_model(), start_layer=-1, loss_function=toy_mse())
    x, y = toy_data(n=4)
    with pytest.raises(ValueError, match="batched"):
        model.batch_jacobian(tf.data.Dataset.from_tensor_slices((x[:, 0], y[:, 0, 0])))


def _three_dense():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d_test_0"),
                             keras.layers.Dense(2, use_bias=False, name="d_test_1"),
                             keras.layers.Dense(1, name="d_test_2")])


def _watched_layers(model: InfluenceModel):
    owners = []
    for variable in model.weights:
        for index, layer in enumerate(model.model.layers):
            if any(variable is weight for weight in layer.weights):
                owners.append(index)
    return sorted(set(owners))


@pytest.mark.parametrize("start, last, expected", [
    (None, None, [1]), (0, None, [0]), (1, None, [1]), (2, None, [2]), ("d_test_0", None, [0]),
    ("d_test_2", None, [2]), (-1, None, [2]), (None, 2, [1, 2]), (None, "d_test_2", [1, 2]), (None, -1, [1, 2]),
    (0, 1, [0, 1]), (0, "d_test_1", [0, 1]), (0, -1, [0, 1, 2]), (0, -2, [0, 1]), (1, "d_test_2", [1, 2]),
    (0, 0, [0]), (-3, -1, [0, 1, 2]),
])
def test_layer_selection_matrix(start, last, expected):
    model = InfluenceModel(_three_dense(), start_layer=start, last_layer=last, loss_function=toy_mse())
    assert _watched_layers(model) == expected
    sizes = {0: 3 * 2 + 2, 1: 2 * 2, 2: 2 + 1}
    assert model.nb_params == sum(sizes[index] for index in expected)


@pytest.mark.parametrize("start, last", [(None, 0), (None, "d_test_0"), (None, -3), (2, 1)])
def test_last_layer_before_start_layer_raises(start, last):
    with pytest.raises(ValueError, match="before start_layer"):
        InfluenceModel(_three_dense(), start_layer=start, last_layer=last, loss_function=toy_mse())


@pytest.mark.parametrize("start, last", [("unknown", None), (0, "unknown"), (3, None), (-4, None), (0, 7)])
def test_unknown_layers_raise(start, last):
    with pytest.raises(ValueError):
        InfluenceModel(_three_dense(), start_layer=start, last_layer=last, loss_function=toy_mse())


def test_default_targeting_skips_the_output_and_weightless_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.Dense(3),
                              keras.layers.Flatten()])
    assert _watched_layers(InfluenceModel(model, loss_function=toy_mse())) == [1]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Activation("relu"),
                              keras.layers.Dense(2)])
    assert _watched_layers(InfluenceModel(model, loss_function=toy_mse())) == [0]


def test_functional_models_count_the_input_layer():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, name="out")(keras.layers.Dense(2, name="hidden")(inputs))
    model = keras.Model(inputs, outputs)
    assert _watched_layers(InfluenceModel(model, loss_function=toy_mse())) == [1]
    assert _watched_layers(InfluenceModel(model, start_layer=-1, loss_function=toy_mse())) == [2]
    with pytest.raises(ValueError, match="no trainable weights"):
        InfluenceModel(model, start_layer=0, loss_function=toy_mse())


def test_loss_as_third_positional_argument_like_the_reference_readme():
    loss = toy_mse()
    model = InfluenceModel(toy_model(), -1, loss)
    assert model.loss_function is loss and model.nb_params == 2


def test_base_influence_model_watches_given_weights():
    keras_model = toy_model()
    model = BaseInfluenceModel(keras_model, [keras_model.layers[1].weights], loss_function=toy_mse())
    assert model.nb_params == 2
    everything = BaseInfluenceModel(keras_model, loss_function=toy_mse())
    assert everything.nb_params == 8
    with pytest.raises(ValueError, match="not weights of the model"):
        BaseInfluenceModel(keras_model, [toy_model(seed=3).layers[0].kernel], loss_function=toy_mse(),
                           weights_processed=True)


def test_loss_with_python_control_flow_on_tensors_still_works():
    """Kernels are traced without AutoGraph first; a loss that needs it (a Python ``if`` on a tensor) is traced
    again with AutoGraph instead of failing."""
    keras.utils.set_random_seed(0)
    keras_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain = keras.losses.MeanSquaredError(reduction=None)

    def branching_loss(y_true, y_pred):
        if tf.reduce_max(tf.abs(y_pred)) > 1e9:  # never true here: same values as the plain loss
            return 0.0 * plain(y_true, y_pred)
        return plain(y_true, y_pred)

    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(4, 3)), tf.float32), tf.constant(rng.normal(size=(4, 2)), tf.float32))
    expected = InfluenceModel(keras_model, start_layer=0, loss_function=plain)
    branching = InfluenceModel(keras_model, start_layer=0, loss_function=branching_loss)
    np.testing.assert_allclose(branching.batch_loss_tensor(batch).numpy(), expected.batch_loss_tensor(batch).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(branching.batch_gradient_tensor(batch).numpy(),
                               expected.batch_gradient_tensor(batch).numpy(), rtol=1e-6)
