"""Layer adapters against per-sample tapes in float64: built-in adapters, a registered custom adapter, layers
without adapter (materialised), refused configurations, and the layers' ``call`` restored."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, InfluenceModel, LayerAdapter, register_layer_adapter
from deel.influenciae.common.factor_plan import LayerPlan, replaced_calls
from deel.influenciae.common.layer_adapters import (CallFactors, Conv2DAdapter, DenseAdapter, EinsumDenseAdapter,
                                                    LayerNormalizationAdapter, image_patches, layer_adapter)
from tests.per_sample import tape_gradients


@pytest.fixture(autouse=True)
def float64():
    """Every layer, input and loss in float64 (the global dtype policy is fixed once a layer was made)."""
    previous, policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_dtype_policy(policy)
    keras.backend.set_floatx(previous)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _check(model, x, y, factored=(), local=(), materialised=False):
    """Factors of every trainable weight against per-sample tapes (1e-10 relative); the listed layers are factored
    (or local), and no weight needs whole-model gradients unless ``materialised``."""
    kernels = BaseInfluenceModel(model, loss_function=_loss()).layer_factors  # every trainable weight
    factors = kernels((tf.constant(x), tf.constant(y)))
    plan = kernels.plan
    assert all(any(item.layer is layer for item in plan.factored) for layer in factored), plan
    assert all(any(item.layer is layer for item in plan.local) for layer in local), plan
    assert plan.fully_factored is not materialised, plan
    expected = tape_gradients(model, _loss(), x, y)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(factors.gradients().numpy(), expected, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(factors.pairwise(factors).numpy(), expected @ expected.T, rtol=0,
                               atol=1e-10 * scale ** 2 * expected.shape[1])
    np.testing.assert_allclose(kernels.squared_norms((x, y)).numpy(), (expected ** 2).sum(1), rtol=1e-10)
    np.testing.assert_allclose(kernels.pairwise((x[:2], y[:2]), (x, y)).numpy(), expected[:2] @ expected.T,
                               rtol=0, atol=1e-10 * scale ** 2 * expected.shape[1])
    return factors


def _labels(rng, count=5):
    return rng.integers(0, 3, count)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)], ids=["features", "sequence", "grid"])
def test_dense_with_activation(shape):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape), keras.layers.Dense(5, activation="tanh"), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softplus")])
    rng = np.random.default_rng(0)
    factors = _check(model, rng.normal(size=(5,) + shape), _labels(rng), factored=model.layers[::2])
    assert factors.layers[0].positions == int(np.prod(shape[:-1]))


@pytest.mark.parametrize("conv", [dict(padding="same"), dict(padding="valid"), dict(strides=2, padding="same"),
                                  dict(strides=(2, 1), padding="valid"), dict(dilation_rate=2, padding="same")],
                         ids=["same", "valid", "strided-same", "strided-valid", "dilated"])
def test_conv2d(conv):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((7, 6, 2)), keras.layers.Conv2D(4, 3, activation="relu", **conv),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(1)
    _check(model, rng.normal(size=(5, 7, 6, 2)), _labels(rng), factored=[model.layers[0]])


def test_einsum_dense_of_multi_head_attention():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(2, 3)
    hidden = keras.layers.Flatten()(attention(inputs, inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    projections = [layer for layer in attention._flatten_layers() if isinstance(layer, keras.layers.EinsumDense)]
    assert len(projections) == 4
    rng = np.random.default_rng(2)
    _check(model, rng.normal(size=(5, 4, 6)), _labels(rng), factored=projections)


@pytest.mark.parametrize("equation, output_shape, bias_axes",
                         [("abc,cde->abde", (4, 2, 3), "de"), ("...b,bc->...c", 5, "c"), ("abc,cd->abd", (4, 5), None)])
def test_einsum_dense_equations(equation, output_shape, bias_axes):
    keras.utils.set_random_seed(3)
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="tanh")
    model = keras.Sequential([keras.Input((4, 6)), layer, keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(3)
    _check(model, rng.normal(size=(5, 4, 6)), _labels(rng), factored=[layer])


def test_embedding():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 4),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(4)
    tokens = np.array([[1, 1, 2], [3, 4, 1], [6, 0, 0], [2, 2, 2], [5, 1, 3]], dtype=np.int32)
    factors = _check(model, tokens, _labels(rng), factored=[model.layers[0]])
    assert factors.layers[0].vocabulary == 7


@pytest.mark.parametrize("axis", [-1, [1, 2]], ids=["last", "two-axes"])
def test_layer_normalization(axis):
    keras.utils.set_random_seed(5)
    norm = keras.layers.LayerNormalization(axis=axis)
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(4, activation="tanh"), norm,
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(5)
    norm.gamma.assign(rng.normal(size=norm.gamma.shape))
    norm.beta.assign(rng.normal(size=norm.beta.shape))
    _check(model, rng.normal(size=(5, 3, 4)), _labels(rng), factored=[norm])


def test_batch_normalization_in_inference_mode():
    keras.utils.set_random_seed(6)
    norm = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 2), norm, keras.layers.ReLU(),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    rng = np.random.default_rng(6)
    for variable, values in ((norm.moving_mean, rng.normal(size=3)), (norm.moving_variance, rng.uniform(0.5, 2, 3)),
                             (norm.gamma, rng.normal(size=3)), (norm.beta, rng.normal(size=3))):
        variable.assign(values)
    _check(model, rng.normal(size=(5, 5, 5, 2)), _labels(rng), factored=[norm])


# A custom layer and its adapter ------------------------------------------------------------------------------------
class Bilinear(keras.layers.Layer):  # pylint: disable=abstract-method,too-many-ancestors
    """``tanh(x W)`` with its own weight: no built-in adapter knows it."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), initializer="glorot_uniform", name="w")

    def call(self, inputs):  # pylint: disable=arguments-differ
        return keras.ops.tanh(keras.ops.matmul(inputs, self.w))


class BilinearAdapter(LayerAdapter):
    """The adapter of :class:`Bilinear`: ``z = x W`` then tanh."""

    def __init__(self):
        self.forward_calls = 0

    def weights(self, layer):
        return [layer.w]

    def kernel(self, layer):
        return layer.w

    def forward(self, layer, probe, inputs, *args, **kwargs):
        self.forward_calls += 1
        return keras.ops.tanh(probe(keras.ops.matmul(inputs, layer.w)))

    def factors(self, layer, inputs, gradients):
        return CallFactors(inputs[:, None, :], gradients[:, None, :], (None,))


def test_a_registered_adapter_is_used():
    adapter = BilinearAdapter()
    register_layer_adapter(Bilinear, adapter)
    assert layer_adapter(Bilinear()) is adapter and layer_adapter(keras.layers.Dense(2)) is not adapter
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((5,)), Bilinear(), keras.layers.Dense(3)])
    rng = np.random.default_rng(7)
    _check(model, rng.normal(size=(5, 5)), _labels(rng), factored=[model.layers[0]])
    assert adapter.forward_calls > 0


def test_register_layer_adapter_checks_its_arguments():
    with pytest.raises(TypeError, match="keras.layers.Layer"):
        register_layer_adapter(int, BilinearAdapter())
    with pytest.raises(TypeError, match="LayerAdapter"):
        register_layer_adapter(Bilinear, object())


# Layers without adapter --------------------------------------------------------------------------------------------
class Offset(keras.layers.Layer):  # pylint: disable=abstract-method,too-many-ancestors
    """``x + w`` (a learned position weight): no adapter, so the layer is local."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal", name="w")

    def call(self, inputs):  # pylint: disable=arguments-differ
        return inputs * 1.5 + self.w


class TiedHead(keras.layers.Layer):  # pylint: disable=abstract-method,too-many-ancestors
    """``x Eᵀ`` with the table of another layer: that layer's weight is used outside its own calls."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def call(self, inputs):  # pylint: disable=arguments-differ
        return keras.ops.matmul(inputs, keras.ops.transpose(self.table.kernel))


def test_a_layer_without_adapter_gets_materialised_gradients():
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((3, 4)), Offset(), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(8)
    factors = _check(model, rng.normal(size=(5, 3, 4)), _labels(rng), factored=model.layers[1::2],
                     local=[model.layers[0]])
    assert factors.layer_factors_of(model.layers[0].w) is None


def test_a_weight_used_outside_its_layer_is_materialised_through_the_whole_model():
    keras.utils.set_random_seed(9)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, use_bias=False)
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Add()([dense(hidden), keras.layers.Dense(3)(TiedHead(dense)(
        keras.layers.Dense(3, activation="tanh")(hidden)))]))
    rng = np.random.default_rng(9)
    _check(model, rng.normal(size=(5, 4)), _labels(rng), materialised=True)
    plan = BaseInfluenceModel(model, loss_function=_loss()).layer_factors.plan_for(
        (rng.normal(size=(2, 4)), _labels(rng, 2)))
    assert any(dense.name in refusal and "outside its calls" in refusal for refusal in plan.refusals)


# Refusals ----------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_refused_configurations_name_the_layer():
    keras.utils.set_random_seed(10)
    grouped = keras.layers.Conv2D(4, 3, groups=2, name="grouped_conv")
    grouped.build((None, 6, 6, 2))
    with pytest.raises(ValueError, match="'grouped_conv'.*groups=2"):
        Conv2DAdapter().check(grouped)
    first = keras.layers.Conv2D(4, 3, data_format="channels_first", name="first_conv")
    first.build((None, 2, 6, 6))
    with pytest.raises(ValueError, match="'first_conv'.*channels_first"):
        Conv2DAdapter().check(first)
    lora = keras.layers.Dense(3, name="lora_dense")
    lora.build((None, 4))
    lora.enable_lora(2)
    with pytest.raises(ValueError, match="'lora_dense'.*LoRA"):
        DenseAdapter().check(lora)
    diagonal = keras.layers.EinsumDense("abc,bc->abc", (4, 6), name="diagonal")
    diagonal.build((None, 4, 6))
    with pytest.raises(ValueError, match="'diagonal'.*input, the kernel and the output"):
        EinsumDenseAdapter().check(diagonal)
    rms = keras.layers.LayerNormalization(rms_scaling=True, name="rms_norm")
    rms.build((None, 4))
    with pytest.raises(ValueError, match="'rms_norm'.*rms_scaling"):
        LayerNormalizationAdapter().check(rms)


def test_a_refused_layer_falls_back_with_the_same_values():
    """An EinsumDense scaling each feature (a letter in the input, the kernel and the output) is refused; its
    weights get per-sample gradients of the layer alone."""
    keras.utils.set_random_seed(11)
    diagonal = keras.layers.EinsumDense("abc,bc->abc", (4, 6), bias_axes="c", activation="tanh", name="diagonal")
    model = keras.Sequential([keras.Input((4, 6)), diagonal, keras.layers.Dense(3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(11)
    factors = _check(model, rng.normal(size=(5, 4, 6)), _labels(rng), factored=model.layers[1::2],
                     local=[diagonal])
    assert factors.layer_factors_of(diagonal.kernel) is None


# The layers' call is restored --------------------------------------------------------------------------------------
def _own_call(layer):
    return "call" not in vars(layer) and layer.call.__func__ is type(layer).call


def test_the_original_call_is_restored_after_tracing_and_after_an_exception():
    keras.utils.set_random_seed(12)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"), Offset(),
                              keras.layers.Dense(3)])
    failing = {"now": False}

    def loss(targets, outputs):
        if failing["now"]:
            raise RuntimeError("loss failed while tracing")
        return _loss()(targets, outputs)

    kernels = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss).layer_factors
    rng = np.random.default_rng(12)
    batch = (rng.normal(size=(5, 4)), _labels(rng))
    kernels(batch)
    assert len(kernels.plan.patched) == 3 and all(_own_call(layer) for layer in model.layers)
    failing["now"] = True
    with pytest.raises(RuntimeError, match="loss failed"):
        kernels.squared_norms((rng.normal(size=(6, 4)), _labels(rng, 6)))
    assert all(_own_call(layer) for layer in model.layers)
    plans = [LayerPlan(layer, layer_adapter(layer), tuple(layer.weights)) for layer in model.layers[::2]]
    with pytest.raises(KeyError):
        with replaced_calls(plans):
            assert not any(_own_call(layer) for layer in model.layers[::2])
            raise KeyError("inside the block")
    assert all(_own_call(layer) for layer in model.layers)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel_size, strides, dilation", [((3, 3), (1, 1), (1, 1)), ((2, 3), (2, 2), (1, 1)),
                                                            ((3, 2), (2, 1), (1, 1)), ((3, 3), (1, 1), (2, 2)),
                                                            ((1, 1), (2, 2), (1, 1))])
def test_image_patches_are_the_patches_of_an_explicit_im2col(padding, kernel_size, strides, dilation):
    """Strided slices of the padded input equal an explicit NumPy im2col (TensorFlow's "SAME" rule: the extra
    padding after), for odd/even sizes, rectangular kernels, strides and dilations, and have the layer's output
    positions."""
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 7, 8, 3))
    layer = keras.layers.Conv2D(4, kernel_size, strides=strides, dilation_rate=dilation, padding=padding)
    outputs = layer(images)
    span = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    counts = [-(-n // s) if padding == "same" else (n - e) // s + 1 for n, s, e in zip((7, 8), strides, span)]
    totals = [max((c - 1) * s + e - n, 0) if padding == "same" else 0
              for c, s, e, n in zip(counts, strides, span, (7, 8))]
    padded = np.pad(images, ((0, 0), (totals[0] // 2, totals[0] - totals[0] // 2),
                             (totals[1] // 2, totals[1] - totals[1] // 2), (0, 0)))
    expected = np.zeros((2, counts[0], counts[1], kernel_size[0] * kernel_size[1] * 3))
    for row, column in np.ndindex(*counts):
        top, left = row * strides[0], column * strides[1]
        window = padded[:, top:top + span[0]:dilation[0], left:left + span[1]:dilation[1], :]
        expected[:, row, column] = window.reshape(2, -1)
    patches = image_patches(layer, tf.constant(images))
    assert tuple(patches.shape[1:3]) == tuple(outputs.shape[1:3]) == tuple(counts)
    np.testing.assert_array_equal(patches.numpy(), expected)
