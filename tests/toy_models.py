"""Tiny models with closed-form gradients and Hessians, used as ground truth across the test suite.

Toy model (SPEC §5): ``f(x) = (x W1) W2`` with ``x`` of shape (1, 3), W1 (3, 2), W2 (2, 1), no biases, and the
squared loss ``l = (f(x) - y)^2`` (MSE over a single output). With ``h = x W1``:

* gradient w.r.t. W2: ``2 (f - y) h``; Hessian w.r.t. W2 (per sample): ``2 h hᵀ``;
* gradient w.r.t. W1: ``2 (f - y) xᵀ W2ᵀ`` (3×2, flattened row-major).
"""
from typing import Tuple

import keras
import numpy as np
import tensorflow as tf

N_SAMPLES = 25
BATCH_SIZE = 5


def toy_model(dtype: str = "float32", seed: int = 0) -> keras.Model:
    """``Sequential([Input((1, 3)), Dense(2, no bias), Dense(1, no bias)])`` with seeded weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((1, 3), dtype=dtype),
                             keras.layers.Dense(2, use_bias=False, dtype=dtype, name="toy_hidden"),
                             keras.layers.Dense(1, use_bias=False, dtype=dtype, name="toy_output")])


def toy_data(n: int = N_SAMPLES, seed: int = 1, dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """x (n, 1, 3) and y (n, 1, 1) drawn from a seeded normal distribution."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 3)).astype(dtype), rng.normal(size=(n, 1, 1)).astype(dtype)


def toy_dataset(x: np.ndarray, y: np.ndarray, batch_size: int = BATCH_SIZE) -> tf.data.Dataset:
    """Batched dataset of (x, y)."""
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def toy_mse(dtype: str = None) -> keras.losses.Loss:
    """Per-sample squared error (computed in ``dtype``: Keras losses cast predictions to their own dtype)."""
    return keras.losses.MeanSquaredError(reduction=None, dtype=dtype)


def toy_weights(model: keras.Model) -> Tuple[np.ndarray, np.ndarray]:
    """W1 (3, 2) and W2 (2, 1) in float64."""
    return (model.layers[0].kernel.numpy().astype(np.float64), model.layers[1].kernel.numpy().astype(np.float64))


def toy_gradients_last_layer(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form per-sample gradients w.r.t. W2: (n, 2) in float64."""
    w1, w2 = toy_weights(model)
    hidden = x[:, 0, :].astype(np.float64) @ w1
    residual = hidden @ w2 - y[:, 0, :].astype(np.float64)
    return 2.0 * residual * hidden


def toy_gradients_all_layers(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form per-sample gradients w.r.t. (W1, W2), flattened row-major and concatenated: (n, 8)."""
    return _gradients_all_layers(*toy_weights(model), x, y)


def _gradients_all_layers(w1: np.ndarray, w2: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inputs = x[:, 0, :].astype(np.float64)
    hidden = inputs @ w1
    residual = (hidden @ w2 - y[:, 0, :].astype(np.float64))[:, 0]
    grad_w1 = 2.0 * residual[:, None, None] * inputs[:, :, None] * w2[:, 0][None, None, :]
    grad_w2 = 2.0 * residual[:, None] * hidden
    return np.concatenate([grad_w1.reshape(len(x), -1), grad_w2], axis=1)


def toy_mean_hessian_last_layer(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Closed-form mean Hessian w.r.t. W2: ``2/n Σ h hᵀ`` (2, 2) in float64."""
    w1, _ = toy_weights(model)
    hidden = x[:, 0, :].astype(np.float64) @ w1
    return 2.0 * hidden.T @ hidden / len(x)


def toy_mean_hessian_all_layers(model: keras.Model, x: np.ndarray, y: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Mean Hessian w.r.t. (W1, W2) by central differences of the closed-form mean gradient: (8, 8) float64."""
    w1, w2 = toy_weights(model)
    theta = np.concatenate([w1.ravel(), w2.ravel()])

    def mean_gradient(params):
        return _gradients_all_layers(params[:6].reshape(3, 2), params[6:].reshape(2, 1), x, y).mean(axis=0)

    columns = []
    for index in range(theta.size):
        shift = np.zeros_like(theta)
        shift[index] = step
        columns.append((mean_gradient(theta + shift) - mean_gradient(theta - shift)) / (2 * step))
    hessian = np.stack(columns, axis=1)
    return 0.5 * (hessian + hessian.T)
