"""Conjugate gradients for symmetric positive-definite operators, many right-hand sides at once."""
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf


def _identity(vectors: tf.Tensor) -> tf.Tensor:
    return vectors


def conjugate_gradients_solve(operator: Callable[[tf.Tensor], tf.Tensor], b: tf.Tensor, x0: Optional[tf.Tensor] = None,
                              *, maxiter: int, tol: float = 1e-3, atol: float = 1e-5,
                              M: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,  # pylint: disable=invalid-name
                              return_info: bool = False) -> Union[tf.Tensor, Tuple[tf.Tensor, dict]]:
    """Solve ``A x = b`` for every column of ``b`` with (preconditioned) conjugate gradients.

    Every column is an independent system; all columns advance together, each with its own step sizes,
    and a column stops moving once its residual satisfies ``||r||^2 <= max(tol^2 ||b||^2, atol^2)``.

    Parameters
    ----------
    operator
        Function applying the symmetric positive-definite matrix A to a (P, K) tensor, returning (P, K).
    b
        Right-hand sides, shape (P,) or (P, K).
    x0
        Starting point of the same shape as ``b`` (zeros by default).
    maxiter
        Maximum number of iterations (each applies ``operator`` once).
    tol, atol
        Relative and absolute tolerances on the residual norm.
    M
        Preconditioner approximating A^-1 (identity by default).
    return_info
        Also return ``{"iterations": int, "residual_norm": (K,) tensor}``.

    Returns
    -------
    x
        Solutions with the shape of ``b`` (and the info dictionary when ``return_info``).
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter}.")
    preconditioner = _identity if M is None else M
    b = tf.convert_to_tensor(b)
    was_vector = b.shape.rank == 1
    if was_vector:
        b = b[:, None]
    if b.shape.rank != 2:
        raise ValueError(f"b must have shape (P,) or (P, K), got {b.shape}.")
    x = tf.zeros_like(b) if x0 is None else tf.reshape(tf.cast(x0, b.dtype), tf.shape(b))

    def column_dot(u, v):
        return tf.reduce_sum(u * v, axis=0)

    threshold = tf.maximum(tf.cast(tol, b.dtype) ** 2 * column_dot(b, b), tf.cast(atol, b.dtype) ** 2)
    residual = b - operator(x)
    direction = preconditioner(residual)
    residual_dot = column_dot(residual, direction)

    def not_done(iteration, _x, res, _p, _rz):
        return tf.logical_and(iteration < maxiter, tf.reduce_any(column_dot(res, res) > threshold))

    def step(iteration, x, res, p, rz):
        active = column_dot(res, res) > threshold
        a_p = operator(p)
        curvature = column_dot(p, a_p)
        alpha = tf.where(tf.logical_and(active, curvature != 0), rz / tf.where(curvature != 0, curvature, 1), 0)
        x = x + alpha * p
        res = res - alpha * a_p
        z = preconditioner(res)
        rz_new = column_dot(res, z)
        beta = tf.where(tf.logical_and(active, rz != 0), rz_new / tf.where(rz != 0, rz, 1), 0)
        p = z + beta * p
        return iteration + 1, x, res, p, rz_new

    iterations, x, residual, _, _ = tf.while_loop(
        not_done, step, (tf.constant(0), x, residual, direction, residual_dot))
    if was_vector:
        x = x[:, 0]
    if return_info:
        return x, {"iterations": iterations, "residual_norm": tf.sqrt(column_dot(residual, residual))}
    return x
