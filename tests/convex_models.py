"""Softmax regression trained to its optimum with L-BFGS: the convex ground truth for retraining tests.

Objective: ``J(θ) = 1/n Σ_i w_i CE_i(θ) + λ/2 ||θ||²`` with θ = (kernel (F, C) row-major, bias (C,)), the layout
of a Keras ``Dense(C)`` layer's weights; ``w_i = 0`` removes sample i while keeping the 1/n factor, which is the
removal that first-order influence predicts with ``regularization=λ``.
"""
import numpy as np
from scipy.optimize import minimize


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
