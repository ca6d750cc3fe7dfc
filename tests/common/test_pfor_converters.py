"""Per-sample gradients of convolutional models: the patch-based pfor converter against per-sample tapes."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import InfluenceModel
from deel.influenciae.common.pfor_converters import per_sample_converters
from tests.per_sample import tape_gradients


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
    expected = tape_gradients(model, loss, x, y)
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
    expected = tape_gradients(model, loss, x, y)
    np.testing.assert_allclose(vectorized, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_attention_per_sample_gradients_match_per_sample_tapes():
    """Every weight of a MultiHeadAttention model: the (n, 1, T, D) x (D, E) products pfor emits for its
    projections used to crash under oneDNN; the folded-rows converter must give the tapes' values."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12, 8))
    hidden = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    hidden = keras.layers.LayerNormalization()(hidden + inputs)
    hidden = keras.layers.Dense(6, activation="relu")(hidden)  # Dense on a sequence: a batched product too
    outputs = keras.layers.Dense(3, use_bias=False)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 12, 8)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=5)]
    influence_model = InfluenceModel(model, start_layer=1, last_layer=-1, loss_function=loss)
    vectorized = influence_model.batch_jacobian_tensor((tf.constant(x), tf.constant(y))).numpy()
    expected = tape_gradients(model, loss, x, y)
    np.testing.assert_allclose(vectorized, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("adjoint_a, adjoint_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shared_shape", [(4, 5), (3, 4, 5)])
def test_batched_product_with_shared_operand_matches_a_loop(adjoint_a, adjoint_b, shared_shape):
    """The converter on its own: per-sample left operands (1, M, K) or (3, M, K) times a shared matrix or stack
    of matrices, with every adjoint combination, against the products taken one sample at a time."""
    rng = np.random.default_rng(6)
    left = rng.normal(size=(7, 1, 6, 4)).astype(np.float32)
    if adjoint_a:
        left = np.swapaxes(left, -1, -2).copy()
    shared = rng.normal(size=shared_shape).astype(np.float32)
    if adjoint_b:
        shared = np.swapaxes(shared, -1, -2).copy()
    shared_tensor = tf.constant(shared)

    @tf.function
    def vectorized(values):
        with per_sample_converters():
            return tf.vectorized_map(lambda value: tf.linalg.matmul(value, shared_tensor, adjoint_a=adjoint_a,
                                                                    adjoint_b=adjoint_b), values)

    expected = np.stack([np.matmul(np.swapaxes(value, -1, -2) if adjoint_a else value,
                                   np.swapaxes(shared, -1, -2) if adjoint_b else shared) for value in left])
    np.testing.assert_allclose(vectorized(tf.constant(left)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_all_converters_are_restored_after_the_block():
    from tensorflow.python.ops.parallel_for import pfor  # pylint: disable=import-outside-toplevel,no-name-in-module
    registry = pfor._pfor_converter_registry  # pylint: disable=protected-access
    originals = {name: registry[name] for name in ("BatchMatMulV2", "Conv2DBackpropFilter")}
    with pytest.raises(RuntimeError):
        with per_sample_converters():
            assert all(registry[name] is not original for name, original in originals.items())
            raise RuntimeError("leave the block")
    assert all(registry[name] is original for name, original in originals.items())
