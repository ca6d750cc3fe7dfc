"""Softmax regression trained to its optimum with L-BFGS: the convex ground truth for retraining tests.

Objective: ``J(θ) = 1/n Σ_i w_i CE_i(θ) + λ/2 ||θ||²`` with θ = (kernel (F, C) row-major, bias (C,)), the layout
of a Keras ``Dense(C)`` layer's weights; ``w_i = 0`` removes sample i while keeping the 1/n factor, which is the
removal that first-order influence predicts with ``regularization=λ``.
"""
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from scipy.optimize import minimize
from sklearn.datasets import load_wine

from deel.influenciae.common import InfluenceModel


def softmax_losses_and_residuals(theta: np.ndarray, x: np.ndarray, y_onehot: np.ndarray):
    """Per-sample cross-entropies (n,) and softmax residuals p − y (n, C) of a softmax regression."""
    features, classes = x.shape[1], y_onehot.shape[1]
    logits = x @ theta[:features * classes].reshape(features, classes) + theta[features * classes:]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -(y_onehot * log_probs).sum(axis=1), np.exp(log_probs) - y_onehot


def fit_softmax_regression(x: np.ndarray, y_onehot: np.ndarray, weights: np.ndarray, theta0: np.ndarray,
                           regularization: float) -> np.ndarray:
    """argmin over θ of ``1/n Σ_i w_i CE_i + λ/2 ||θ||²`` (n = len(x)), to a gradient norm of ~1e-12."""
    n = len(x)

    def objective(theta):
        losses, residuals = softmax_losses_and_residuals(theta, x, y_onehot)
        residuals = residuals * weights[:, None]
        gradient = np.concatenate([(x.T @ residuals).ravel(), residuals.sum(axis=0)]) / n + regularization * theta
        return weights @ losses / n + 0.5 * regularization * theta @ theta, gradient

    return minimize(objective, theta0, jac=True, method="L-BFGS-B",
                    options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15}).x


@dataclass
class WineSoftmaxProblem:
    """Standardised wine data (130 training, 48 held-out samples), its optimum θ* and the matching influence model.

    ``influence_model`` wraps a float64 ``Dense(3)`` holding θ* with its per-sample cross-entropy (no L2 term: it is
    passed to the calculators as ``regularization``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_held: np.ndarray
    y_held: np.ndarray
    theta_star: np.ndarray
    influence_model: InfluenceModel
    train: tf.data.Dataset
    held: tf.data.Dataset


def wine_softmax_problem(regularization: float, seed: int = 0) -> WineSoftmaxProblem:
    """Fit the softmax regression on a seeded split of scikit-learn's bundled wine data (no network)."""
    data = load_wine()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = data.data[order]
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = np.eye(3)[data.target[order]]
    x_train, y_train, x_held, y_held = x[:130], y[:130], x[130:], y[130:]
    features = x_train.shape[1]
    theta_star = fit_softmax_regression(x_train, y_train, np.ones(len(x_train)), np.zeros(features * 3 + 3),
                                        regularization)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((features,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    model.layers[0].set_weights([theta_star[:features * 3].reshape(features, 3), theta_star[features * 3:]])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    return WineSoftmaxProblem(x_train, y_train, x_held, y_held, theta_star,
                              InfluenceModel(model, start_layer=0, loss_function=loss),
                              tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(32),
                              tf.data.Dataset.from_tensor_slices((x_held, y_held)).batch(16))
