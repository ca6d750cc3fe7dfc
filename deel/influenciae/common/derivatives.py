"""Derivatives of plain functions of one tensor: the gradient-tape code of the methods that differentiate
something other than the model's per-sample loss (RPS-L2's surrogate objective, the boundary methods' scores).

The model's loss has its own compiled kernels (:mod:`.autodiff`); these helpers keep tapes out of the methods.
"""
from typing import Callable

import tensorflow as tf


def gradient_of(function: Callable[[tf.Tensor], tf.Tensor], point: tf.Tensor) -> tf.Tensor:
    """``∇f(point)`` of a scalar function: shaped like ``point``."""
    with tf.GradientTape() as tape:
        tape.watch(point)
        value = function(point)
    return tape.gradient(value, point)


def hessian_vector_products(function: Callable[[tf.Tensor], tf.Tensor], point: tf.Tensor,
                            vectors: tf.Tensor) -> tf.Tensor:
    """``∇²f(point) V`` of a scalar function of a flat point (P,), for (P, K) vectors, by double backward: (P, K)."""
    with tf.GradientTape() as outer:
        outer.watch(point)
        gradient = gradient_of(function, point)
        projections = tf.linalg.matvec(vectors, gradient, transpose_a=True)
    return tf.transpose(outer.jacobian(projections, point))


def values_and_jacobian(function: Callable[[tf.Tensor], tf.Tensor], point: tf.Tensor):
    """``(f(point) (C,), Jacobian (C, P))`` of a vector function of a flat point (P,); coordinates that do not
    reach the output give zeros."""
    with tf.GradientTape() as tape:
        tape.watch(point)
        outputs = function(point)
    return outputs, tape.jacobian(outputs, point, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def values_and_input_jacobians(function: Callable[[tf.Tensor], tf.Tensor], points: tf.Tensor):
    """``(f(points) (B, C), ∂f/∂x per sample (B, C, *x_shape))`` of a function applied row by row to a batch."""
    with tf.GradientTape() as tape:
        tape.watch(points)
        values = function(points)
    return values, tape.batch_jacobian(values, points)
