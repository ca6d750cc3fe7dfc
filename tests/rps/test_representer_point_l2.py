"""RPS-L2 against a float64 numpy ground truth: ridge solution, alpha formula, representer theorem."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.rps import RepresenterPointL2
from deel.influenciae.utils import ORDER
from tests.assertions import assert_close_to_max as _close

LAMBDA = 1e-3
CCE64 = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")


def classifier(n_classes=3, dtype="float64", seed=0, functional=False, bias_last=False, activation=None, l2=None):
    """4 inputs -> Dense(6, tanh) -> Dense(n_classes, no bias) (L2 penalty ``l2 ||W||²`` on the last kernel)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), dtype=dtype)
    hidden = keras.layers.Dense(6, activation="tanh", dtype=dtype, name="hidden")
    last = keras.layers.Dense(n_classes, use_bias=bias_last, activation=activation, dtype=dtype, name="last",
                              kernel_regularizer=None if l2 is None else keras.regularizers.L2(l2))
    if functional:
        return keras.Model(inputs, last(hidden(inputs)))
    return keras.Sequential([inputs, hidden, last])


def features_and_logits(model, x):
    """Numpy float64 features (input of the last layer) and logits (its pre-activation output)."""
    hidden, last = model.get_layer("hidden"), model.get_layer("last")
    features = np.tanh(x @ hidden.kernel.numpy().astype(np.float64) + hidden.bias.numpy().astype(np.float64))
    return features, features @ last.kernel.numpy().astype(np.float64)


def data(n, seed, n_classes=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(dtype)
    y = np.eye(n_classes)[rng.integers(0, n_classes, n)].astype(dtype) if n_classes > 1 else \
        rng.integers(0, 2, (n, 1)).astype(dtype)
    return x, y


def batched(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


@pytest.fixture(name="setup", scope="module")
def fixture_setup():
    model = classifier()
    before = [w.copy() for w in model.get_weights()]
    x_train, y_train = data(40, 1)
    x_test, y_test = data(9, 2)
    train, test = batched(x_train, y_train, 7), batched(x_test, y_test, 4)  # short last batches, different sizes
    rps = RepresenterPointL2(model, train, None, lambda_regularization=LAMBDA, epochs=20, surrogate_target="logits")
    z_train, t_train = features_and_logits(model, x_train)
    z_test, t_test = features_and_logits(model, x_test)
    n = len(x_train)
    ridge = np.linalg.solve(z_train.T @ z_train / n + LAMBDA * np.eye(6), z_train.T @ t_train / n)
    alpha = (t_train - z_train @ ridge) / (LAMBDA * n)  # -1/(2λn) · 2(Φ - T)
    return {"model": model, "before": before, "rps": rps, "train": train, "test": test, "ridge": ridge,
            "alpha": alpha, "z_train": z_train, "t_train": t_train, "z_test": z_test, "t_test": t_test}


def test_surrogate_is_the_l2_stationary_point_and_fits_the_logits(setup):
    rps = setup["rps"]
    assert rps.surrogate.inputs[0].shape == (None, 6) and rps.surrogate.outputs[0].shape == (None, 3)
    _close(rps.surrogate.layers[-1].kernel.numpy(), setup["ridge"], 1e-8)
    mae = rps.surrogate_mae
    print(f"RPS-L2 surrogate MAE on the training logits: {mae:.2e} (mean |logit| "
          f"{np.abs(setup['t_train']).mean():.2e})")
    assert mae < 0.05 * np.abs(setup["t_train"]).mean()
    assert np.isclose(mae, np.abs(setup["z_train"] @ setup["ridge"] - setup["t_train"]).mean(), rtol=1e-6)
    for actual, expected in zip(setup["model"].get_weights(), setup["before"]):
        np.testing.assert_array_equal(actual, expected)  # the user's model is untouched


def test_alpha_follows_the_paper(setup):
    rps = setup["rps"]
    _close(rps.training_alpha, setup["alpha"], 1e-8)
    vectors = [(alpha.numpy(), z.numpy()) for _, (alpha, z) in rps.compute_influence_vector(setup["train"])]
    assert [v[0].shape for v in vectors] == [(7, 3)] * 5 + [(5, 3)]
    _close(np.concatenate([v[0] for v in vectors]), setup["alpha"], 1e-8)
    _close(np.concatenate([v[1] for v in vectors]), setup["z_train"], 1e-10)


def test_representer_theorem(setup):
    rps, z_test = setup["rps"], setup["z_test"]
    surrogate_logits = z_test @ setup["ridge"]
    rebuilt = np.concatenate([rps.predict_with_kernel(tuple(batch)).numpy() for batch in setup["test"]])
    _close(rebuilt, surrogate_logits, 1e-4)
    # Summing the pairwise values over the training set rebuilds the logit of the predicted class.
    values = rps.estimate_influence_values_matrix(setup["test"], setup["train"]).numpy()
    predicted = setup["t_test"].argmax(axis=1)
    _close(values.sum(axis=1), surrogate_logits[np.arange(len(z_test)), predicted], 1e-4)


def test_pairwise_values_self_influence_and_top_k(setup):
    rps, alpha = setup["rps"], setup["alpha"]
    predicted = setup["t_test"].argmax(axis=1)
    expected = alpha[:, predicted].T * (setup["z_test"] @ setup["z_train"].T)
    _close(rps.estimate_influence_values_matrix(setup["test"], setup["train"]), expected, 1e-8)
    blocks = [[v.numpy().shape for _, v in inner] for _, inner in
              rps.estimate_influence_values_in_batches(setup["test"], setup["train"])]
    assert blocks[0] == [(4, 7)] * 5 + [(4, 5)] and blocks[-1][-1] == (1, 5)
    self_expected = np.abs(alpha[np.arange(40), setup["t_train"].argmax(axis=1)])
    per_batch = [v.numpy() for _, v in rps.compute_influence_values(setup["train"])]
    assert per_batch[0].shape == (7, 1)
    _close(np.concatenate(per_batch)[:, 0], self_expected, 1e-8)
    _, _, indices = rps.compute_top_k_from_training_dataset(setup["train"], 4, return_indices=True)
    np.testing.assert_array_equal(indices.numpy(), np.argsort(-self_expected, kind="stable")[:4])
    found = [i.numpy() for _, _, _, i in rps.top_k(setup["test"], setup["train"], k=3, order=ORDER.DESCENDING,
                                                   d_type=tf.float64, return_indices=True)]
    np.testing.assert_array_equal(np.concatenate(found), np.argsort(-expected, axis=1, kind="stable")[:, :3])


def test_labels_target_follows_the_paper():
    """Surrogate trained on the cross-entropy with the training labels + λ||W||² (Yeh et al. eq. 2)."""
    strong = 0.05
    model = classifier(seed=8, l2=strong)  # trained on the surrogate's objective
    x_train, y_train = data(40, 9)
    x_test, y_test = data(7, 10)
    optimizer = keras.optimizers.Adam(1e-2)

    @tf.function
    def step():  # full batch: mean cross-entropy + λ||W||² (the kernel regulariser)
        with tf.GradientTape() as tape:
            objective = tf.reduce_mean(CCE64(y_train, model(x_train))) + tf.add_n(model.losses)
        optimizer.apply_gradients(zip(tape.gradient(objective, model.trainable_variables),
                                      model.trainable_variables))

    for _ in range(400):
        step()
    train, test = batched(x_train, y_train, 16), batched(x_test, y_test, 3)
    rps = RepresenterPointL2(model, train, CCE64, strong, epochs=10)
    z_train, t_train = features_and_logits(model, x_train)
    z_test, t_test = features_and_logits(model, x_test)
    kernel = rps.surrogate.layers[-1].kernel.numpy()
    logits = z_train @ kernel
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    alpha = -(probabilities - y_train) / (2 * strong * 40)  # -1/(2λn) ∂CE/∂Φ
    _close(rps.training_alpha, alpha, 1e-8)
    _close(kernel, z_train.T @ alpha, 1e-6)  # stationarity: W = Σ_i z_iᵀ alpha_i
    print(f"RPS-L2 (labels) surrogate MAE on the training logits: {rps.surrogate_mae:.2e} (mean |logit| "
          f"{np.abs(t_train).mean():.2e})")
    assert rps.surrogate_mae < 0.05 * np.abs(t_train).mean()  # the model was trained on the same objective
    _close(np.concatenate([rps.predict_with_kernel(tuple(b)).numpy() for b in test]), z_test @ kernel, 1e-4)
    predicted = t_test.argmax(1)
    values = rps.estimate_influence_values_matrix(test, train).numpy()
    _close(values, alpha[:, predicted].T * (z_test @ z_train.T), 1e-8)
    _close(values.sum(1), (z_test @ kernel)[np.arange(7), predicted], 1e-4)
    _close(rps._compute_influence_values(train)[:, 0],  # pylint: disable=protected-access
           np.abs(alpha[np.arange(40), t_train.argmax(1)]), 1e-8)


def test_binary_float32_with_keras_loss_and_functional_model():
    model = classifier(n_classes=1, dtype="float32", seed=3, functional=True, activation="sigmoid")
    x_train, y_train = data(30, 4, n_classes=1, dtype=np.float32)
    x_test, y_test = data(6, 5, n_classes=1, dtype=np.float32)
    train, test = batched(x_train, y_train, 8), batched(x_test, y_test, 6)
    rps = RepresenterPointL2(model, train, keras.losses.MeanSquaredError(reduction=None), LAMBDA, epochs=10,
                             surrogate_target="logits")
    z_train, t_train = features_and_logits(model, x_train.astype(np.float64))
    z_test, _ = features_and_logits(model, x_test.astype(np.float64))
    kernel = rps.surrogate.layers[-1].kernel.numpy()
    # Keras MSE averages over the C = 1 outputs: same ridge problem as the squared distance.
    ridge = np.linalg.solve(z_train.T @ z_train / 30 + LAMBDA * np.eye(6), z_train.T @ t_train / 30)
    _close(kernel, ridge, 1e-5)
    _close(np.concatenate([rps.predict_with_kernel(tuple(b)).numpy() for b in test]), z_test @ kernel, 1e-4)
    values = rps.estimate_influence_values_matrix(test, train).numpy()
    assert values.shape == (6, 30)
    _close(values.sum(axis=1), (z_test @ kernel)[:, 0], 1e-4)
    self_values = rps._compute_influence_values(train).numpy()  # pylint: disable=protected-access
    assert self_values.shape == (30, 1)
    _close(self_values[:, 0], np.abs(rps.training_alpha.numpy()[:, 0]), 1e-4)  # alpha in float32


def test_earlier_target_layer():
    model = classifier(seed=6)
    x_train, y_train = data(25, 7)
    train = batched(x_train, y_train, 10)
    rps = RepresenterPointL2(model, train, None, LAMBDA, epochs=5, layer_index=-2, surrogate_target="logits")
    _, t_train = features_and_logits(model, x_train)
    ridge = np.linalg.solve(x_train.T @ x_train / 25 + LAMBDA * np.eye(4), x_train.T @ t_train / 25)
    _close(rps.surrogate.layers[-1].kernel.numpy(), ridge, 1e-8)
    _close(rps.predict_with_kernel((x_train, y_train)), x_train @ ridge, 1e-4)


def test_errors():
    x_train, y_train = data(10, 1)
    train = batched(x_train, y_train, 5)
    with pytest.raises(ValueError, match="Dense layer with no bias"):
        RepresenterPointL2(classifier(bias_last=True), train, CCE64, LAMBDA)
    not_dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False), keras.layers.Softmax()])
    with pytest.raises(ValueError, match="Dense layer with no bias"):
        RepresenterPointL2(not_dense, train, CCE64, LAMBDA)
    with pytest.raises(ValueError, match="reduction"):
        RepresenterPointL2(classifier(), train, keras.losses.MeanSquaredError(), LAMBDA)
    with pytest.raises(ValueError, match="logits"):
        RepresenterPointL2(classifier(), train, CCE64, LAMBDA, surrogate_target="logits")
    with pytest.raises(ValueError, match="needs the training loss_function"):
        RepresenterPointL2(classifier(), train, None, LAMBDA)
    with pytest.raises(ValueError, match="surrogate_target"):
        RepresenterPointL2(classifier(), train, CCE64, LAMBDA, surrogate_target="probabilities")
    with pytest.raises(ValueError, match="batched"):
        RepresenterPointL2(classifier(), train.unbatch(), CCE64, LAMBDA)
    with pytest.raises(ValueError, match="lambda_regularization"):
        RepresenterPointL2(classifier(), train, CCE64, 0.0)
