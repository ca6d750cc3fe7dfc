"""Fisher curvature operators against closed forms on a linear softmax classifier (where the true Fisher, the
Gauss–Newton matrix and the Hessian coincide) and a two-layer network (GGN from explicit Jacobians)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import ExactIHVP, FisherOperator, HessianOperator, InfluenceModel


def _linear_softmax(sparse: bool):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 4)).astype(np.float32).astype(np.float64)  # exact through keras.Input (float32)
    labels = rng.integers(0, 3, size=23)
    y = labels if sparse else np.eye(3)[labels]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False, dtype="float64")])
    model.layers[0].set_weights([rng.normal(size=(4, 3))])
    loss_class = keras.losses.SparseCategoricalCrossentropy if sparse else keras.losses.CategoricalCrossentropy
    loss = loss_class(from_logits=True, reduction="none", dtype="float64")
    influence_model = InfluenceModel(model, start_layer=0, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    return influence_model, dataset, x, labels, model


@pytest.mark.parametrize("sparse", [False, True])
def test_true_fisher_of_a_linear_softmax_model_is_its_hessian(sparse):
    influence_model, dataset, x, labels, model = _linear_softmax(sparse)
    fisher = FisherOperator(influence_model, dataset, kind="true")
    total, count = fisher.dense_sum()
    hessian, hessian_count = HessianOperator(influence_model, dataset).dense_sum()
    assert count == hessian_count == 23
    np.testing.assert_allclose(total.numpy(), hessian.numpy(), rtol=1e-10, atol=1e-12)
    # closed form: Σ_z (diag(p) - p pᵀ) ⊗ x xᵀ, weights flattened as W[i, c] (row-major: index i * 3 + c)
    probabilities = tf.nn.softmax(model(x)).numpy()
    expected = sum(np.kron(np.outer(x_z, x_z), np.diag(p_z) - np.outer(p_z, p_z)) for x_z, p_z in zip(x, probabilities))
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-10, atol=1e-12)
    vectors = np.random.default_rng(1).normal(size=(12, 2))
    np.testing.assert_allclose(fisher.matvec(tf.constant(vectors)).numpy(), expected @ vectors / 23, rtol=1e-10)


def test_empirical_fisher_is_the_mean_outer_product_of_the_gradients():
    influence_model, dataset, x, labels, model = _linear_softmax(sparse=False)
    probabilities = tf.nn.softmax(model(x)).numpy()
    gradients = np.stack([np.outer(x_z, p_z - np.eye(3)[y_z]).ravel() for x_z, p_z, y_z in zip(x, probabilities,
                                                                                                labels)])
    total, count = FisherOperator(influence_model, dataset, kind="empirical").dense_sum()
    np.testing.assert_allclose(total.numpy() / count, gradients.T @ gradients / 23, rtol=1e-10, atol=1e-12)


def test_gauss_newton_of_a_two_layer_network_from_explicit_jacobians():
    """Hidden tanh layer: the true Fisher is Σ Jᵀ (diag(p) - ppᵀ) J, not the Hessian; the exact solver on it is a
    positive-definite Cholesky solve for any λ > 0."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 3)).astype(np.float32).astype(np.float64)
    y = np.eye(4)[rng.integers(0, 4, size=9)]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh", dtype="float64"),
                              keras.layers.Dense(4, dtype="float64")])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    expected = np.zeros((influence_model.nb_params, influence_model.nb_params))
    for x_z in x:
        with tf.GradientTape() as tape:
            logits = model(x_z[None])[0]
        jacobian = tape.jacobian(logits, model.trainable_variables)
        flat = np.concatenate([j.numpy().reshape(4, -1) for j in jacobian], axis=1)
        p_z = tf.nn.softmax(logits).numpy()
        expected += flat.T @ (np.diag(p_z) - np.outer(p_z, p_z)) @ flat
    fisher = FisherOperator(influence_model, dataset)
    total, _ = fisher.dense_sum()
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-8, atol=1e-12)
    solver = ExactIHVP(influence_model, curvature=fisher, regularization=1e-3)
    assert solver.cholesky_factor is not None
    vectors = rng.normal(size=(influence_model.nb_params, 2))
    np.testing.assert_allclose(solver.solve(tf.constant(vectors)).numpy(),
                               np.linalg.solve(expected / 9 + 1e-3 * np.eye(len(expected)), vectors), rtol=1e-6)


def test_fisher_errors():
    influence_model, dataset, *_ = _linear_softmax(sparse=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        FisherOperator(influence_model, dataset, kind="hessian")
    opaque = InfluenceModel(influence_model.model, start_layer=0,
                            loss_function=lambda y_true, y_pred: tf.reduce_sum((y_true - y_pred) ** 2, axis=-1))
    with pytest.raises(ValueError, match="from_logits"):
        FisherOperator(opaque, dataset, kind="true")
    FisherOperator(opaque, dataset, kind="empirical")  # needs no probabilities
    with pytest.raises(ValueError, match="batched"):
        FisherOperator(influence_model, dataset.unbatch())
