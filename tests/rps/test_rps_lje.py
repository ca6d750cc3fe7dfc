"""RPS-LJE against an independent float64 numpy derivation (ascent step, Kronecker Hessian, pinv, projection)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import CGDIHVPFactory, ExactIHVPFactory, InfluenceModel
from deel.influenciae.rps import RepresenterPointLJE
from deel.influenciae.utils import ORDER
from tests.rps.test_representer_point_l2 import batched, classifier, data, features_and_logits
from tests.assertions import assert_close_to_max as _close

ETA = 1e-4


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def lje_alpha_numpy(z, y, kernel, binary):
    """Independent derivation: W' = W + η Σ_i ∇ℓ_i(W); H' = mean_i (z_i z_iᵀ) ⊗ S_i(W') (row-major vec of W);
    Θ_i = (W' - unvec(H'⁺ vec ∇ℓ_i(W'))) / n; alpha_i = Θ_iᵀ z_i / ||z_i||²."""
    n, d = z.shape
    c = kernel.shape[1]

    def probabilities(w):
        logits = z @ w
        return 1.0 / (1.0 + np.exp(-logits)) if binary else softmax(logits)

    def residuals(w):  # ∂ℓ_i/∂Φ_i for the cross-entropy on logits
        return probabilities(w) - y

    perturbed = kernel + ETA * np.einsum("id,ic->dc", z, residuals(kernel))
    p = probabilities(perturbed)
    if binary:
        curvature = (p * (1 - p))[:, :, None]  # (n, 1, 1)
    else:
        curvature = np.einsum("ic,ce->ice", p, np.eye(c)) - np.einsum("ic,ie->ice", p, p)
    hessian = np.mean([np.kron(np.outer(z[i], z[i]), curvature[i]) for i in range(n)], axis=0)
    gradients = np.einsum("id,ic->idc", z, residuals(perturbed)).reshape(n, d * c)
    corrections = (gradients @ np.linalg.pinv(hessian)).reshape(n, d, c)  # H' symmetric
    theta = (perturbed[None] - corrections) / n
    return np.einsum("idc,id->ic", theta, z) / (z ** 2).sum(axis=1, keepdims=True)


def build(n_classes, seed):
    model = classifier(n_classes=n_classes, seed=seed)
    x_train, y_train = data(30, seed + 1, n_classes)
    x_test, y_test = data(11, seed + 2, n_classes)
    if n_classes == 1:
        loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float64")
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=loss)
    train, test = batched(x_train, y_train, 7), batched(x_test, y_test, 4)
    z_train, t_train = features_and_logits(model, x_train)
    z_test, t_test = features_and_logits(model, x_test)
    kernel = model.get_layer("last").kernel.numpy().astype(np.float64)
    return {"model": model, "influence_model": influence_model, "train": train, "test": test,
            "alpha": lje_alpha_numpy(z_train, y_train, kernel, n_classes == 1), "z_train": z_train,
            "z_test": z_test, "t_train": t_train, "t_test": t_test}


@pytest.fixture(name="multiclass", scope="module")
def fixture_multiclass():
    setup = build(3, 10)
    before = [w.copy() for w in setup["model"].get_weights()]
    setup["rps"] = RepresenterPointLJE(setup["influence_model"], setup["train"], ExactIHVPFactory())
    setup["before"] = before
    return setup


def test_alpha_matches_the_numpy_derivation(multiclass):
    rps = multiclass["rps"]
    vectors = [(alpha.numpy(), z.numpy()) for _, (alpha, z) in rps.compute_influence_vector(multiclass["train"])]
    assert [v[0].shape for v in vectors] == [(7, 3)] * 4 + [(2, 3)]
    _close(np.concatenate([v[0] for v in vectors]), multiclass["alpha"], 1e-6)
    _close(np.concatenate([v[1] for v in vectors]), multiclass["z_train"], 1e-10)
    for actual, expected in zip(multiclass["model"].get_weights(), multiclass["before"]):
        np.testing.assert_array_equal(actual, expected)  # the perturbation acts on a copy


def test_multiclass_values_with_different_batch_sizes(multiclass):
    rps, alpha = multiclass["rps"], multiclass["alpha"]
    predicted = multiclass["t_test"].argmax(axis=1)
    expected = alpha[:, predicted].T * (multiclass["z_test"] @ multiclass["z_train"].T)
    _close(rps.estimate_influence_values_matrix(multiclass["test"], multiclass["train"]), expected, 1e-6)
    shapes = [[v.numpy().shape for _, v in inner] for _, inner in
              rps.estimate_influence_values_in_batches(multiclass["test"], multiclass["train"])]
    assert shapes[0] == [(4, 7)] * 4 + [(4, 2)] and shapes[-1] == [(3, 7)] * 4 + [(3, 2)]
    self_expected = np.abs(alpha[np.arange(30), multiclass["t_train"].argmax(axis=1)])
    _close(rps._compute_influence_values(multiclass["train"])[:, 0], self_expected, 1e-6)  # pylint: disable=W0212
    found = [i.numpy() for _, _, _, i in rps.top_k(multiclass["test"], multiclass["train"], k=3, order=ORDER.ASCENDING,
                                                   d_type=tf.float64, return_indices=True)]
    np.testing.assert_array_equal(np.concatenate(found), np.argsort(expected, axis=1, kind="stable")[:, :3])
    features, classes = rps._preprocess_samples(next(iter(multiclass["test"])))  # pylint: disable=W0212
    _close(features, multiclass["z_test"][:4], 1e-10)
    np.testing.assert_array_equal(classes.numpy(), predicted[:4])


def test_functional_model_gives_the_same_alpha(multiclass):
    functional = classifier(functional=True)
    functional.set_weights(multiclass["model"].get_weights())
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    rps = RepresenterPointLJE(InfluenceModel(functional, start_layer=-1, loss_function=loss), multiclass["train"])
    alpha = np.concatenate([a.numpy() for _, (a, _) in rps.compute_influence_vector(multiclass["train"])])
    _close(alpha, multiclass["alpha"], 1e-6)


def test_binary_values_and_self_influence():
    setup = build(1, 20)
    rps = RepresenterPointLJE(setup["influence_model"], setup["train"])
    alpha = setup["alpha"]
    vectors = np.concatenate([a.numpy() for _, (a, _) in rps.compute_influence_vector(setup["train"])])
    _close(vectors, alpha, 1e-6)
    expected = alpha[:, 0][None, :] * (setup["z_test"] @ setup["z_train"].T)
    _close(rps.estimate_influence_values_matrix(setup["test"], setup["train"]), expected, 1e-6)
    _close(rps._compute_influence_values(setup["train"])[:, 0], np.abs(alpha[:, 0]), 1e-6)  # pylint: disable=W0212


def test_hessian_subset_iterative_solver_and_errors(multiclass):
    subset = RepresenterPointLJE(multiclass["influence_model"], multiclass["train"], n_samples_for_hessian=12)
    assert sum(int(tf.shape(z)[0]) for z, _ in subset.hessian_dataset) == 12 and subset.n_train == 30
    cgd = RepresenterPointLJE(multiclass["influence_model"], multiclass["train"], CGDIHVPFactory(n_cgd_iters=20))
    alpha_cgd = np.concatenate([a.numpy() for _, (a, _) in cgd.compute_influence_vector(multiclass["train"])])
    assert np.isfinite(alpha_cgd).all() and alpha_cgd.shape == (30, 3)
    with pytest.raises(ValueError, match="last layer"):
        RepresenterPointLJE(multiclass["influence_model"], multiclass["train"], target_layer=-2)
    with pytest.raises(ValueError, match="batched"):
        RepresenterPointLJE(multiclass["influence_model"], multiclass["train"].unbatch())
    with_bias = InfluenceModel(classifier(bias_last=True), start_layer=-1,
                               loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None,
                                                                                dtype="float64"))
    with pytest.raises(ValueError, match="Dense layer with no bias"):
        RepresenterPointLJE(with_bias, multiclass["train"])
    with pytest.raises(TypeError, match="InfluenceModel"):
        RepresenterPointLJE(multiclass["model"], multiclass["train"])
