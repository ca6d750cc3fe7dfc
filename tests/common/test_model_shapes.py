"""Every model shape for the solvers that cut the model (CG, LiSSA) and for representer points (RPS-L2, RPS-LJE):
two-input Functional models (list and dict inputs), a Sequential built with ``.add()`` and a subclassed model.

Ground truth: each of these models computes exactly what a plain single-input Sequential with the same weights
computes (the two inputs are concatenated first), so every value must equal the plain model's; and the plain
model's CG/LiSSA values must equal the exact solve (tested elsewhere, re-checked here against a float64 solve).
"""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel, LissaIHVP)
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE
from deel.influenciae.utils import LayerInputCapture, split_model_shared

N_FEATURES_A, N_FEATURES_B, N_HIDDEN, N_CLASSES = 4, 3, 5, 3
LAMBDA = 0.05


class Subclassed(keras.Model):  # pylint: disable=abstract-method
    """Dense(5, tanh) then Dense(3, no bias), written as a subclassed model."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(N_HIDDEN, activation="tanh")
        self.last = keras.layers.Dense(N_CLASSES, use_bias=False)

    def call(self, inputs):  # pylint: disable=arguments-differ
        return self.last(self.hidden(inputs))


def plain_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((N_FEATURES_A + N_FEATURES_B,)),
                             keras.layers.Dense(N_HIDDEN, activation="tanh", name="hidden"),
                             keras.layers.Dense(N_CLASSES, use_bias=False, name="last")])


def two_input_model(as_dict):
    first, second = keras.Input((N_FEATURES_A,), name="a"), keras.Input((N_FEATURES_B,), name="b")
    joined = keras.layers.Concatenate()([first, second])
    hidden = keras.layers.Dense(N_HIDDEN, activation="tanh", name="hidden")(joined)
    outputs = keras.layers.Dense(N_CLASSES, use_bias=False, name="last")(hidden)
    return keras.Model({"a": first, "b": second} if as_dict else [first, second], outputs)


def added_sequential():
    model = keras.Sequential()
    model.add(keras.Input((N_FEATURES_A + N_FEATURES_B,)))
    model.add(keras.layers.Dense(N_HIDDEN, activation="tanh", name="hidden"))
    model.add(keras.layers.Dense(N_CLASSES, use_bias=False, name="last"))
    return model


def subclassed():
    model = Subclassed()
    model(np.zeros((1, N_FEATURES_A + N_FEATURES_B), np.float32))
    return model


SHAPES = {"list": lambda: two_input_model(False), "dict": lambda: two_input_model(True), "add": added_sequential,
          "subclassed": subclassed}


def data(count, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, N_FEATURES_A + N_FEATURES_B)).astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, count)]
    return x, y


def dataset(shape, x, y, batch_size):
    """The samples in the layout the model of ``shape`` takes: (x, y), ((a, b), y) or ({a, b}, y)."""
    first, second = x[:, :N_FEATURES_A], x[:, N_FEATURES_A:]
    inputs = {"list": (first, second), "dict": {"a": first, "b": second}}.get(shape, x)
    return tf.data.Dataset.from_tensor_slices((inputs, y)).batch(batch_size)


def loss():
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


@pytest.fixture(scope="module", name="setup")
def fixture_setup():
    reference = plain_model()
    models = {name: build() for name, build in SHAPES.items()}
    for model in models.values():
        model.set_weights(reference.get_weights())
    x_train, y_train = data(22, 1)
    x_test, y_test = data(9, 2)
    return reference, models, (x_train, y_train), (x_test, y_test)


def first_order_values(model, start_layer, train, test, solver):
    """(self-influence (N,), pairwise (T, N)) of the first-order calculator with the given solver."""
    influence_model = InfluenceModel(model, start_layer=start_layer, last_layer=-1, loss_function=loss())
    ihvp = solver(influence_model, train)
    calculator = FirstOrderInfluenceCalculator(influence_model, train, ihvp)
    self_influence = calculator._compute_influence_values(train)  # pylint: disable=protected-access
    pairwise = tf.concat([calculator._estimate_influence_values_from_influence_vector(  # pylint: disable=W0212
        tuple(batch), tf.concat([calculator._compute_influence_vector(tuple(t))  # pylint: disable=W0212
                                 for t in train], 0)) for batch in test], 0)
    return self_influence.numpy().ravel(), pairwise.numpy()


SOLVERS = {
    "cg": lambda model, train: ConjugateGradientDescentIHVP(model, None, train, regularization=LAMBDA, tol=1e-7,
                                                            atol=1e-9, n_opt_iters=200),
    "lissa": lambda model, train: LissaIHVP(model, None, train, regularization=LAMBDA, scale=5.0, damping=0.0,
                                            n_opt_iters=600),
}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_iterative_solvers_on_every_model_shape(setup, shape, solver):
    reference, models, (x_train, y_train), (x_test, y_test) = setup
    exact = lambda model, train: ExactIHVP(model, train, regularization=LAMBDA)  # noqa: E731
    expected_self, expected_pairwise = first_order_values(
        reference, -1, dataset("plain", x_train, y_train, 8), dataset("plain", x_test, y_test, 4), exact)
    model = models[shape]
    start = -1  # the last layer: a convex Hessian; the model is cut below it (CG/LiSSA only run the head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the subclassed model cannot be cut: whole-model HVPs
        values_self, values_pairwise = first_order_values(
            model, start, dataset(shape, x_train, y_train, 8), dataset(shape, x_test, y_test, 4), SOLVERS[solver])
    np.testing.assert_allclose(values_self, expected_self, rtol=2e-3, atol=1e-4 * np.abs(expected_self).max())
    np.testing.assert_allclose(values_pairwise, expected_pairwise, rtol=2e-3,
                               atol=2e-3 * np.abs(expected_pairwise).max())


def test_exact_reference_matches_a_float64_solve(setup):
    """The plain model's exact values against NumPy: the damped mean Hessian of the watched last layer built from
    the closed form of softmax cross-entropy (kron(z zᵀ, diag(p) - p pᵀ)), solved in float64."""
    reference, _, (x_train, y_train), _ = setup
    train = dataset("plain", x_train, y_train, 8)
    influence_model = InfluenceModel(reference, start_layer=-1, loss_function=loss())
    calculator = FirstOrderInfluenceCalculator(influence_model, train, ExactIHVP(influence_model, train,
                                                                                 regularization=LAMBDA))
    values = calculator._compute_influence_values(train).numpy().ravel()  # pylint: disable=protected-access
    features = np.tanh(x_train.astype(np.float64) @ reference.layers[0].kernel.numpy()
                       + reference.layers[0].bias.numpy()).astype(np.float64)
    logits = features @ reference.layers[1].kernel.numpy().astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    hessian = np.mean([np.kron(np.outer(z, z), np.diag(p) - np.outer(p, p))
                       for z, p in zip(features, probabilities)], axis=0)
    gradients = np.einsum("id,ic->idc", features, probabilities - y_train).reshape(len(features), -1)
    solved = np.linalg.solve(hessian + LAMBDA * np.eye(len(hessian)), gradients.T).T
    np.testing.assert_allclose(values, np.sum(gradients * solved, 1), rtol=1e-3)


def rps_values(calculator, train, test):
    influence = tf.concat([calculator._compute_influence_vector(tuple(t))[0]  # pylint: disable=protected-access
                           for t in train], 0)
    features = tf.concat([calculator._compute_influence_vector(tuple(t))[1]  # pylint: disable=protected-access
                          for t in train], 0)
    pairwise = tf.concat([calculator._estimate_influence_values_from_influence_vector(  # pylint: disable=W0212
        tuple(batch), (influence, features)) for batch in test], 0)
    return pairwise.numpy()


@pytest.mark.parametrize("method", ["l2", "lje"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_representer_points_on_every_model_shape(setup, shape, method):
    reference, models, (x_train, y_train), (x_test, y_test) = setup

    def build(model, train):
        if method == "l2":
            return RepresenterPointL2(model, train, loss(), lambda_regularization=0.01, epochs=20)
        return RepresenterPointLJE(InfluenceModel(model, start_layer=-1, loss_function=loss()), train)

    expected = rps_values(build(reference, dataset("plain", x_train, y_train, 8)), dataset("plain", x_train, y_train, 8),
                          dataset("plain", x_test, y_test, 4))
    values = rps_values(build(models[shape], dataset(shape, x_train, y_train, 8)),
                        dataset(shape, x_train, y_train, 8), dataset(shape, x_test, y_test, 4))
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_added_sequential_splits_like_a_list_built_one(setup):
    _, models, (x_train, _), _ = setup
    extractor, head = split_model_shared(models["add"], "last")
    np.testing.assert_allclose(head(extractor(x_train)).numpy(), models["add"](x_train).numpy(), rtol=1e-6)
    assert {id(v) for v in head.trainable_variables} == {id(v) for v in models["add"].layers[-1].trainable_variables}


def test_layer_input_capture_leaves_the_model_unchanged(setup):
    reference, models, (x_train, _), _ = setup
    model = models["subclassed"]
    capture = LayerInputCapture(model, model.last)
    expected = np.tanh(x_train @ reference.layers[0].kernel.numpy() + reference.layers[0].bias.numpy())
    np.testing.assert_allclose(capture(x_train).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert "call" not in vars(model.last)
    np.testing.assert_allclose(model(x_train).numpy(), reference(x_train).numpy(), rtol=1e-6)


def test_subclassed_rps_needs_the_last_layer(setup):
    _, models, (x_train, y_train), _ = setup
    with pytest.raises(ValueError, match="target_layer=-1"):
        RepresenterPointL2(models["subclassed"], dataset("subclassed", x_train, y_train, 8), loss(), layer_index=0)
