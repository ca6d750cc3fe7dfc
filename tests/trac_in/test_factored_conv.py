"""Factored per-layer gradients of convolutions, layers on sequences, embeddings and normalisations against
per-sample tapes, through the factors and through TracIn."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import InfluenceModel, LayerFactors
from deel.influenciae.trac_in import TracIn
from tests.per_sample import tape_gradients

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def per_sample_tapes(model, x, y):
    """Ground truth: one GradientTape per sample, flattened like the library's layout."""
    return tape_gradients(model, LOSS, x, y)


def conv_model(seed, channels=2, **conv_args):
    """Conv2D (the configuration under test) + BatchNormalization with non-trivial statistics + a second conv."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((9, 9, channels)), keras.layers.Conv2D(8, 3, activation="tanh", **conv_args),
                              keras.layers.BatchNormalization(), keras.layers.Conv2D(4, 2, activation="tanh"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    rng = np.random.default_rng(seed)
    norm = model.layers[1]
    norm.moving_mean.assign(rng.normal(size=8).astype(np.float32))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    norm.gamma.assign(rng.normal(size=8).astype(np.float32))
    norm.beta.assign(rng.normal(size=8).astype(np.float32))
    return model


def sequence_model(seed):
    """Dense and EinsumDense on sequences, LayerNormalization, an embedding and multi-head attention."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((3,), dtype="int32")
    hidden = keras.layers.Embedding(40, 16)(tokens)
    hidden = keras.layers.Dense(16, activation="tanh")(hidden)
    hidden = keras.layers.LayerNormalization()(hidden + keras.layers.MultiHeadAttention(2, 8)(hidden, hidden))
    hidden = keras.layers.EinsumDense("abc,cd->abd", (3, 16), bias_axes="d", activation="tanh")(hidden)
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))


CONV_CASES = [dict(strides=1, padding="valid"), dict(strides=2, padding="same"), dict(strides=(2, 1), padding="valid"),
              dict(dilation_rate=2, padding="same"), dict(dilation_rate=(2, 1), padding="valid"),
              dict(strides=2, padding="same", use_bias=False)]


def _kernels(factors):
    """The per-layer factors that hold a kernel (Σ_p a δᵀ)."""
    return [factor for factor in factors.layers if factor.kernel is not None]


def _check_factors(model, x, y, gram):
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors(
        (tf.constant(x), tf.constant(y)))
    assert factors is not None
    assert any(factor.positions > 1 for factor in _kernels(factors))
    gradients = per_sample_tapes(model, x, y)
    scale = 0.5
    expected = 0.5 * gradients @ gradients.T
    np.testing.assert_allclose(scale * factors.pairwise(factors).numpy(), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(scale * factors.squared_norms().numpy(), 0.5 * (gradients ** 2).sum(1),
                               rtol=1e-5)
    np.testing.assert_allclose(2.0 * factors.gradients().numpy(), 2 * gradients,
                               rtol=1e-4, atol=1e-5 * np.abs(gradients).max())
    if gram is not None:
        assert all(factor.prefers_gram(True) is gram for factor in _kernels(factors))


@pytest.fixture(params=[True, False], ids=["gram", "materialised"])
def product_form(request, monkeypatch):
    """Both product forms of every factor: the Gram form and the formed per-sample gradient."""
    monkeypatch.setattr(LayerFactors, "prefers_gram", lambda self, pairwise: request.param)
    return request.param


@pytest.mark.parametrize("conv_args", CONV_CASES, ids=[str(sorted(case.items())) for case in CONV_CASES])
def test_conv_factored_products_match_per_sample_tapes(conv_args, product_form):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 9, 9, 2)).astype(np.float32), rng.integers(0, 3, 5)
    _check_factors(conv_model(1, **conv_args), x, y, product_form)


def test_sequences_embeddings_and_attention_match_per_sample_tapes(product_form):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 40, (6, 3)).astype(np.int32), rng.integers(0, 3, 6)
    _check_factors(sequence_model(3), x, y, product_form)


def _outer(rows, deltas):
    """Factors of a kernel with the given rows and output gradients."""
    return LayerFactors(keras.layers.Dense(int(deltas.shape[-1])), rows, deltas)


def test_the_cheaper_form_is_chosen():
    """Few positions and wide layers: Gram form; many positions: the formed gradient (pairwise)."""
    few = _outer(tf.zeros([2, 4, 72]), tf.zeros([2, 4, 32]))
    many = _outer(tf.zeros([2, 49, 18]), tf.zeros([2, 49, 8]))
    assert few.prefers_gram(True) and few.prefers_gram(False)
    assert not many.prefers_gram(True) and not many.prefers_gram(False)
    assert _outer(tf.zeros([2, 1, 3]), tf.zeros([2, 1, 2])).prefers_gram(True)


def test_wide_conv_with_few_positions_uses_the_gram_form():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4, 4, 8)), keras.layers.Conv2D(32, 3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(5)
    _check_factors(model, rng.normal(size=(4, 4, 4, 8)).astype(np.float32), rng.integers(0, 3, 4), None)
    factors = _kernels(InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors(
        (tf.zeros([2, 4, 4, 8]), tf.zeros([2], tf.int32))))
    assert factors[0].positions == 4 and factors[0].prefers_gram(True)


@pytest.mark.filterwarnings("ignore:Per-sample gradients could not be fully vectorized")
def test_unsupported_weights_are_materialised_beside_factored_ones():
    """A depthwise convolution's weights get vectorized per-sample gradients; the convolution after it is
    factored; the products match per-sample tapes."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.DepthwiseConv2D(3), keras.layers.Conv2D(2, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 4)
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors(
        (tf.constant(x), tf.constant(y)))
    depthwise, conv = model.layers[0], model.layers[1]
    assert factors.layer_factors_of(depthwise.kernel) is None and factors.layer_factors_of(conv.kernel) is not None
    gradients = per_sample_tapes(model, x, y)
    np.testing.assert_allclose(1.0 * factors.squared_norms().numpy(),
                               (gradients ** 2).sum(1), rtol=1e-5)


@pytest.mark.parametrize("build, shape", [(conv_model, (9, 9, 2)), (sequence_model, (3,))])
def test_tracin_on_cnn_and_transformer_matches_per_sample_tapes(build, shape):
    """TracIn over two checkpoints: matrix, self-influence, per-batch values and influence vectors."""
    rng = np.random.default_rng(8)
    models = [build(9), build(10)]

    def draw(count):
        if shape == (3,):
            return rng.integers(0, 40, (count, 3)).astype(np.int32), rng.integers(0, 3, count)
        return rng.normal(size=(count,) + shape).astype(np.float32), rng.integers(0, 3, count)

    (x_train, y_train), (x_test, y_test) = draw(7), draw(3)
    rates = [0.3, 0.05]
    tracin = TracIn([InfluenceModel(m, start_layer=0, last_layer=-1, loss_function=LOSS) for m in models], rates)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(4)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3)
    train_gradients = [per_sample_tapes(m, x_train, y_train) for m in models]
    test_gradients = [per_sample_tapes(m, x_test, y_test) for m in models]
    expected = sum(rate * t @ g.T for rate, t, g in zip(rates, test_gradients, train_gradients))
    tolerance = dict(rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(tracin.estimate_influence_values_matrix(test, train).numpy(), expected, **tolerance)
    block = tracin._estimate_individual_influence_values_from_batch(  # pylint: disable=protected-access
        (x_train[:4], y_train[:4]), (x_test, y_test))
    np.testing.assert_allclose(block.numpy(), expected[:, :4], **tolerance)
    expected_self = sum(rate * (g ** 2).sum(1) for rate, g in zip(rates, train_gradients))
    np.testing.assert_allclose(tracin._compute_influence_values(train).numpy()[:, 0],  # pylint: disable=W0212
                               expected_self, rtol=1e-4)
    vectors = tracin._compute_influence_vector((x_train, y_train)).numpy()  # pylint: disable=protected-access
    scaled = np.concatenate([np.sqrt(rate) * g for rate, g in zip(rates, train_gradients)], axis=1)
    np.testing.assert_allclose(vectors, scaled, rtol=1e-4, atol=1e-5 * np.abs(scaled).max())
    assert tracin._factored.supported  # pylint: disable=protected-access
