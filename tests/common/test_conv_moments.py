"""``Σ a aᵀ`` and ``Σ a`` of a stride-1 convolution's patches from shifted copies of its input, against an explicit
NumPy im2col in float64; which convolutions get them."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel
from deel.influenciae.common.conv_moments import stride_one_patch_moments


def _im2col(images, kernel, padding):
    """(N·T, kh·kw·C) patches of a stride-1 channels-last convolution, each flattened as (kh, kw, C)."""
    if padding == "same":
        images = np.pad(images, ((0, 0), ((kernel[0] - 1) // 2, kernel[0] // 2), ((kernel[1] - 1) // 2,
                                                                                  kernel[1] // 2), (0, 0)))
    rows, columns = images.shape[1] - kernel[0] + 1, images.shape[2] - kernel[1] + 1
    return np.stack([images[:, r:r + kernel[0], c:c + kernel[1], :].reshape(len(images), -1)
                     for r in range(rows) for c in range(columns)], axis=1).reshape(-1, np.prod(kernel) *
                                                                                    images.shape[3])


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("size, kernel", [((7, 9), (3, 3)), ((6, 6), (2, 3)), ((5, 4), (1, 1)), ((8, 7), (3, 1)),
                                          ((9, 9), (5, 5)), ((4, 4), (3, 3))])
def test_moments_equal_those_of_the_explicit_patches(size, kernel, padding):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3, *size, 2))
    patches = _im2col(images, kernel, padding)
    products, sums = stride_one_patch_moments(tf.constant(images), kernel, padding, tf.float64)
    np.testing.assert_allclose(products.numpy(), patches.T @ patches, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sums.numpy(), patches.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_large_stride_one_convolutions_get_moments_and_others_their_patches():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 2))
    hidden = keras.layers.Conv2D(3, 3, padding="same", name="stride_one")(inputs)
    hidden = keras.layers.Conv2D(3, 3, strides=2, name="stride_two")(hidden)
    hidden = keras.layers.Conv2D(3, 3, padding="same", name="small")(hidden)
    hidden = keras.layers.Conv2D(3, 2, dilation_rate=2, padding="same", name="dilated")(hidden)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)
    batch = (tf.random.normal((4, 16, 16, 2), seed=1), tf.constant([0, 1, 1, 0]))
    factors = {layer.layer.name: layer for layer in influence_model.layer_factors.in_graph(batch).layers}
    assert factors["stride_one"].row_moments is not None  # 16 × 16 output positions
    for name in ("stride_two", "small", "dilated"):  # 7 × 7 positions, or strided / dilated
        assert factors[name].row_moments is None
    for name in ("stride_one", "stride_two", "small", "dilated"):  # windows whatever the geometry
        windows = factors[name].row_windows()
        np.testing.assert_array_equal(tf.concat(windows, axis=-1).numpy(), factors[name].inputs.numpy())
