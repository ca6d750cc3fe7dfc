"""Backtracking line search: linear regression recovery, Armijo acceptance, iteration cap, step-size bounds."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import BacktrackingLineSearch, BTLSParameters, backtracking_line_search


def test_fits_a_linear_regression_with_minibatches():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (100, 1)).astype(np.float32)
    y = (0.42 * x + 0.66).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    search = BacktrackingLineSearch(batches_per_epoch=10, scaling_factor=0.1)
    assert search.parameters.gamma == pytest.approx(2 ** 0.1)
    for _ in range(15):
        for x_batch, y_batch in dataset:
            search.step(lambda xb=x_batch, yb=y_batch: tf.reduce_mean(tf.square(model(xb) - yb)),
                        model.trainable_variables)
    kernel, bias = model.get_weights()
    assert abs(kernel[0, 0] - 0.42) < 5e-2 and abs(bias[0] - 0.66) < 5e-2
    assert search.parameters.min_eta <= search.eta <= search.parameters.max_eta


def test_full_batch_minimize_reaches_least_squares():
    rng = np.random.default_rng(1)
    a = tf.constant(rng.normal(size=(20, 3)))
    b = tf.constant(rng.normal(size=(20, 1)))
    w = tf.Variable(tf.zeros((3, 1), tf.float64))
    loss = BacktrackingLineSearch(scaling_factor=0.3).minimize(
        lambda: tf.reduce_mean(tf.square(a @ w - b)), [w], iterations=500, gradient_tolerance=1e-10)
    expected = np.linalg.lstsq(a.numpy(), b.numpy(), rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-6)
    assert loss == pytest.approx(float(np.mean((a.numpy() @ expected - b.numpy()) ** 2)), rel=1e-8)


def test_armijo_condition_and_iteration_cap():
    w = tf.Variable([1.0], dtype=tf.float64)
    parameters = BTLSParameters(beta=0.5, gamma=1.0, eta=1.0, max_backtracks=7)
    # f(w) = w²: from w = 1 with g = 2, eta = 1 gives 1 (rejected), eta = 0.5 gives 0 (accepted).
    new_loss, accepted, trials = backtracking_line_search(lambda: tf.reduce_sum(w ** 2), [w], [tf.constant([2.0],
                                                          tf.float64)], tf.constant(1.0, tf.float64), parameters, 0.1)
    assert accepted and trials == 2 and new_loss == 0.0 and parameters.eta == 0.5 and w.numpy()[0] == 0.0
    # A loss that never decreases: the search stops after max_backtracks trials and restores the weights.
    w.assign([3.0])
    calls = []

    def stubborn():
        calls.append(1)
        return tf.constant(100.0, tf.float64)

    new_loss, accepted, trials = backtracking_line_search(stubborn, [w], [tf.constant([1.0], tf.float64)],
                                                          tf.constant(1.0, tf.float64), parameters)
    assert not accepted and trials == 7 and len(calls) == 7 and new_loss == 1.0 and w.numpy()[0] == 3.0
    # min_eta stops the search earlier than max_backtracks.
    tight = BTLSParameters(beta=0.1, gamma=1.0, eta=1.0, min_eta=1e-3, max_backtracks=100)
    _, accepted, trials = backtracking_line_search(stubborn, [w], [tf.constant([1.0], tf.float64)],
                                                   tf.constant(1.0, tf.float64), tight)
    assert not accepted and trials == 4


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scaling_factor"):
        BacktrackingLineSearch(scaling_factor=1.5)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        BacktrackingLineSearch(batches_per_epoch=0)
    with pytest.raises(ValueError, match="beta"):
        BacktrackingLineSearch(parameters=BTLSParameters(beta=1.0))
    assert BacktrackingLineSearch(4, 0.2).get_config()["batches_per_epoch"] == 4
