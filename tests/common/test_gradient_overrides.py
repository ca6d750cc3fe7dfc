"""Second derivatives through the fused softmax cross-entropy ops, with the gradients installed while our kernels
are traced, against closed forms (linear softmax model) and TensorFlow's own gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, InfluenceModel
from deel.influenciae.common.gradient_overrides import cheap_second_derivatives

NB_CLASSES = 4
NB_FEATURES = 3


def softmax64(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def linear_softmax_problem(seed=0, nb_samples=9):
    """A Dense(4) model without activation on 3 features, its float64 weights and data."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((NB_FEATURES,)), keras.layers.Dense(NB_CLASSES)])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(nb_samples, NB_FEATURES)).astype(np.float32)
    y = rng.integers(0, NB_CLASSES, size=nb_samples)
    weights = rng.normal(scale=0.7, size=(NB_FEATURES, NB_CLASSES)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=NB_CLASSES).astype(np.float32)
    model.set_weights([weights, bias])
    return model, x, y


def closed_form_summed_hessian(model, x, sample_weight=None):
    """Σ_i w_i J_iᵀ (diag p_i - p_i p_iᵀ) J_i for θ = (vec W row-major, b), J_i = [x_iᵀ ⊗ I, I], float64."""
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_weights())
    inputs = x.astype(np.float64)
    probabilities = softmax64(inputs @ kernel + bias)
    weights = np.ones(len(x)) if sample_weight is None else sample_weight
    nb_params = NB_FEATURES * NB_CLASSES + NB_CLASSES
    hessian = np.zeros((nb_params, nb_params))
    for row, p, w in zip(inputs, probabilities, weights):
        # dz_c / dW[a, d] = x_a δ_cd; row-major flattening of W (in, out) puts (a, d) at a·C + d.
        jacobian = np.hstack([np.einsum("a,cd->cad", row, np.eye(NB_CLASSES)).reshape(NB_CLASSES, -1),
                              np.eye(NB_CLASSES)])
        hessian += w * jacobian.T @ (np.diag(p) - np.outer(p, p)) @ jacobian
    return hessian


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_and_hvp_of_fused_cross_entropy_match_the_closed_form(sparse, weighted):
    model, x, y = linear_softmax_problem(seed=1)
    if sparse:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        targets = y
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        targets = np.eye(NB_CLASSES, dtype=np.float32)[y]
    sample_weight = np.random.default_rng(2).uniform(0.5, 2.0, size=len(x)).astype(np.float32) if weighted else None
    batch = (tf.constant(x), tf.constant(targets)) + ((tf.constant(sample_weight),) if weighted else ())
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    expected = closed_form_summed_hessian(model, x, sample_weight)
    hessian = influence_model.batch_hessian_tensor(batch).numpy()
    np.testing.assert_allclose(hessian, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    vectors = np.random.default_rng(3).normal(size=(expected.shape[0], 5)).astype(np.float32)
    products = influence_model.batch_hvp_tensor(batch, tf.constant(vectors)).numpy()
    np.testing.assert_allclose(products, expected @ vectors, rtol=1e-4, atol=1e-5 * np.abs(expected @ vectors).max())


def test_hessian_of_a_hidden_layer_model_matches_tensorflows_own_gradients():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(11, 5)).astype(np.float32), rng.integers(0, 3, size=11)

    @tf.function
    def reference_hessian():  # TensorFlow's registered gradients (traced outside the override)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_sum(loss(y, model(x, training=False)))
            gradients = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(value, model.trainable_variables)], 0)
        blocks = outer.jacobian(gradients, model.trainable_variables)
        return tf.concat([tf.reshape(block, [tf.shape(gradients)[0], -1]) for block in blocks], 1)

    expected = reference_hessian().numpy()
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    hessian = influence_model.batch_hessian_tensor((tf.constant(x), tf.constant(y))).numpy()
    np.testing.assert_allclose(hessian, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_dense_label_gradient_is_kept_under_the_override():
    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(size=(4, 3)).astype(np.float32))
    labels = tf.constant(softmax64(rng.normal(size=(4, 3))).astype(np.float32))
    upstream = tf.constant(rng.uniform(0.5, 2.0, size=4).astype(np.float32))

    @tf.function
    def label_gradient():
        with cheap_second_derivatives():
            with tf.GradientTape() as tape:
                tape.watch(labels)
                value = tf.reduce_sum(upstream * tf.nn.softmax_cross_entropy_with_logits(labels, logits))
            return tape.gradient(value, labels)

    expected = upstream.numpy()[:, None] * -np.log(softmax64(logits.numpy().astype(np.float64)))
    np.testing.assert_allclose(label_gradient().numpy(), expected, rtol=1e-5)


def test_gradients_are_replaced_only_inside_the_block():
    from tensorflow.python.framework import ops  # pylint: disable=import-outside-toplevel,no-name-in-module
    registry = ops._gradient_registry._registry  # pylint: disable=protected-access
    originals = {name: registry[name]["type"] for name in ("SoftmaxCrossEntropyWithLogits",
                                                            "SparseSoftmaxCrossEntropyWithLogits")}
    with cheap_second_derivatives():
        assert all(registry[name]["type"] is not function for name, function in originals.items())
    assert all(registry[name]["type"] is function for name, function in originals.items())
    with pytest.raises(RuntimeError):
        with cheap_second_derivatives():
            raise RuntimeError("boom")
    assert all(registry[name]["type"] is function for name, function in originals.items())


@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_of_confident_samples_keep_their_relative_precision(sparse):
    """``1 - p_y`` far below float32's spacing near 1: the fused op rounds ``p_y - 1`` to 0, the library's gradients
    (per-sample kernels and layer factors) keep it, against a float64 closed form."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    weights = np.array([[12.0, 0, 0], [0, 3, 0], [0, 0, 1]])
    model.set_weights([weights, np.zeros(3)])
    x = np.array([[2.0, 0.1, 0.0], [1.5, 0.0, 0.2], [0.1, 0.2, 0.3]], np.float32)
    labels = np.array([0, 0, 1])
    loss_class = keras.losses.SparseCategoricalCrossentropy if sparse else keras.losses.CategoricalCrossentropy
    targets = labels if sparse else np.eye(3, dtype=np.float32)[labels]
    influence_model = BaseInfluenceModel(model, model.trainable_variables,
                                         loss_function=loss_class(from_logits=True, reduction="none"))
    batch = (tf.constant(x), tf.constant(targets))
    logits = x.astype(np.float64) @ weights
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    deltas = probabilities - np.eye(3)[labels]
    assert 1 - probabilities[0, 0] < 1e-9  # p_0 - 1 rounds to 0 in float32
    expected = np.concatenate([np.einsum("bi,bo->bio", x, deltas).reshape(3, -1), deltas], axis=1)
    for gradients in (influence_model.batch_jacobian_tensor(batch), influence_model.layer_factors.gradients(batch)):
        relative = np.abs(gradients.numpy() - expected).max(axis=1) / np.abs(expected).max(axis=1)
        assert relative.max() < 1e-5
