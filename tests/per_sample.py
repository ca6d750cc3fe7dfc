"""Ground truth shared by the tests: per-sample gradients from one GradientTape per sample (no vectorization)."""
import numpy as np
import tensorflow as tf


def tape_gradients(model, loss, x, y) -> np.ndarray:
    """Gradients of ``loss(y_i, model(x_i))`` w.r.t. every trainable weight, one tape per sample, flattened
    row-major and concatenated in ``model.trainable_variables`` order (the library's layout): (n, P) float64."""
    rows = []
    for sample_x, sample_y in zip(x, y):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(sample_y[None], model(sample_x[None], training=False)))
        gradients = tape.gradient(value, model.trainable_variables)
        rows.append(np.concatenate([tf.convert_to_tensor(g).numpy().ravel() for g in gradients]))
    return np.stack(rows).astype(np.float64)
