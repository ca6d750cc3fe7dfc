"""Per-sample gradients of convolutional models: the patch-based pfor converter against per-sample tapes."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import InfluenceModel
from deel.influenciae.common.pfor_converters import per_sample_converters


def per_sample_loop(model, loss, x, y):
    """Ground truth: one GradientTape per sample (no vectorization), flattened like the library's layout."""
    rows = []
    for sample_x, sample_y in zip(x, y):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(sample_y[None], model(sample_x[None], training=False)))
        gradients = tape.gradient(value, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in gradients]))
    return np.stack(rows)


@pytest.mark.parametrize("strides, dilation, padding", [(1, 1, "valid"), (2, 1, "same"), (1, 2, "same"),
                                                        (2, 1, "valid")])
def test_conv_per_sample_gradients_match_per_sample_tapes(strides, dilation, padding):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((9, 9, 2)),
        keras.layers.Conv2D(3, (3, 2), strides=strides, dilation_rate=dilation, padding=padding, activation="tanh"),
        keras.layers.Conv2D(4, 2, padding="same"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=7)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    vectorized = influence_model.batch_jacobian_tensor((tf.constant(x), tf.constant(y))).numpy()
    expected = per_sample_loop(model, loss, x, y)
    np.testing.assert_allclose(vectorized, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_converter_is_installed_only_inside_the_block():
    from tensorflow.python.ops.parallel_for import pfor  # pylint: disable=import-outside-toplevel,no-name-in-module
    original = pfor._pfor_converter_registry["Conv2DBackpropFilter"]  # pylint: disable=protected-access
    with per_sample_converters():
        assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is not original  # pylint: disable=W0212
    assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is original  # pylint: disable=protected-access


def test_conv1d_per_sample_gradients_match_per_sample_tapes():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((10, 3)), keras.layers.Conv1D(4, 3, strides=2, activation="relu"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    loss = keras.losses.MeanSquaredError(reduction=None)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 10, 3)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    vectorized = influence_model.batch_jacobian_tensor((tf.constant(x), tf.constant(y))).numpy()
    expected = per_sample_loop(model, loss, x, y)
    np.testing.assert_allclose(vectorized, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
