"""Gradient descent with a backtracking (Armijo) line search, as a plain helper.

Keras 3 has no Keras-2 ``Optimizer`` subclassing API, so the line search is written as a function of a loss closure
and a list of variables. One step from the current weights ``w`` with gradient ``g`` and loss ``L(w)``:

1. grow the step size: ``eta <- min(eta * gamma, max_eta)``;
2. try ``w' = w - eta g`` and accept it when the Armijo (sufficient decrease) condition holds::

       L(w') <= L(w) - eta * scaling_factor * ||g||²

3. otherwise shrink ``eta <- eta * beta`` and try again, at most ``max_backtracks`` times and never below
   ``min_eta``. If no step size is accepted, the weights are left unchanged.

Unlike the reference, the number of trials per step is capped, and a failed search never leaves the weights on a
worse point.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf


@dataclass
class BTLSParameters:
    """Parameters of the backtracking line search.

    Attributes
    ----------
    beta
        Shrink factor of the step size after a rejected trial, in (0, 1).
    gamma
        Growth factor applied to the step size before each step (>= 1); the reference uses
        ``2 ** (1 / batches_per_epoch)`` so the step size may double once per epoch.
    eta
        Current (initial) step size.
    max_eta, min_eta
        Bounds of the step size.
    max_backtracks
        Cap on the number of rejected trials per step.
    """

    beta: float = 0.9
    gamma: float = 2.0
    eta: float = 1.0
    max_eta: float = 10.0
    min_eta: float = 1e-6
    max_backtracks: int = 100


def _global_sq_norm(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(gradient, tf.float64))) for gradient in gradients])


def backtracking_line_search(loss_fn: Callable[[], tf.Tensor], variables: Sequence, gradients: Sequence[tf.Tensor],
                             current_loss: tf.Tensor, parameters: BTLSParameters,
                             scaling_factor: float = 0.1) -> Tuple[float, bool, int]:
    """One gradient step with a backtracking line search; updates ``variables`` and ``parameters.eta`` in place.

    Parameters
    ----------
    loss_fn
        Closure returning the scalar loss at the current values of ``variables``.
    variables
        Variables to update (Keras 3 or TensorFlow variables).
    gradients
        Gradients of the loss w.r.t. ``variables`` at their current values (same shapes).
    current_loss
        Loss at the current values.
    parameters
        Step-size state and bounds; ``parameters.eta`` holds the accepted step size on return.
    scaling_factor
        Armijo constant c of ``L(w - eta g) <= L(w) - eta c ||g||²``.

    Returns
    -------
    new_loss, accepted, trials
        The loss after the step (``current_loss`` if nothing was accepted), whether a step was taken and the
        number of loss evaluations.
    """
    if len(variables) != len(gradients):
        raise ValueError(f"Got {len(variables)} variables but {len(gradients)} gradients.")
    saved = [tf.identity(tf.convert_to_tensor(variable)) for variable in variables]
    current = float(current_loss)
    sq_norm = float(_global_sq_norm(gradients))
    eta = min(parameters.eta * parameters.gamma, parameters.max_eta)
    trials = 0
    while trials < max(int(parameters.max_backtracks), 1) and eta >= parameters.min_eta:
        for variable, start, gradient in zip(variables, saved, gradients):
            variable.assign(start - tf.cast(eta, start.dtype) * tf.cast(gradient, start.dtype))
        new_loss = float(loss_fn())
        trials += 1
        if new_loss <= current - eta * scaling_factor * sq_norm:
            parameters.eta = min(max(eta, parameters.min_eta), parameters.max_eta)
            return new_loss, True, trials
        eta *= parameters.beta
    for variable, start in zip(variables, saved):
        variable.assign(start)
    parameters.eta = min(max(eta, parameters.min_eta), parameters.max_eta)
    return current, False, trials


class BacktrackingLineSearch:
    """Gradient descent whose step size is chosen by a backtracking (Armijo) line search.

    Parameters
    ----------
    batches_per_epoch
        Used for the default growth factor ``gamma = 2 ** (1 / batches_per_epoch)``.
    scaling_factor
        Armijo constant c (sufficient decrease ``eta c ||g||²``).
    parameters
        Explicit :class:`BTLSParameters` (overrides ``batches_per_epoch``'s default gamma).

    Examples
    --------
    >>> search = BacktrackingLineSearch(batches_per_epoch=10)
    >>> for x, y in dataset:  # doctest: +SKIP
    ...     loss = search.step(lambda: loss_of(model(x), y), model.trainable_variables)
    """

    def __init__(self, batches_per_epoch: float = 1, scaling_factor: float = 0.1,
                 parameters: Optional[BTLSParameters] = None):
        if batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be > 0, got {batches_per_epoch}.")
        if not 0.0 < scaling_factor < 1.0:
            raise ValueError(f"scaling_factor must be in (0, 1), got {scaling_factor}.")
        self.batches_per_epoch = batches_per_epoch
        self.scaling_factor = scaling_factor
        self.parameters = parameters if parameters is not None else BTLSParameters(
            gamma=2.0 ** (1.0 / batches_per_epoch))
        if not 0.0 < self.parameters.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.parameters.beta}.")

    @property
    def eta(self) -> float:
        """Current step size."""
        return self.parameters.eta

    def step(self, loss_fn: Callable[[], tf.Tensor], variables: Sequence,
             gradients: Optional[List[tf.Tensor]] = None, current_loss: Optional[tf.Tensor] = None) -> float:
        """One line-search gradient step on ``variables``; returns the loss after the step.

        ``gradients`` and ``current_loss`` are computed from ``loss_fn`` when not given.
        """
        variables = list(variables)
        if gradients is None or current_loss is None:
            with tf.GradientTape() as tape:
                current_loss = loss_fn()
            gradients = tape.gradient(current_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        new_loss, _, _ = backtracking_line_search(loss_fn, variables, gradients, current_loss, self.parameters,
                                                  self.scaling_factor)
        return new_loss

    def minimize(self, loss_fn: Callable[[], tf.Tensor], variables: Sequence, iterations: int,
                 gradient_tolerance: float = 0.0) -> float:
        """Run up to ``iterations`` full steps; stop early when ``||g|| <= gradient_tolerance`` or no step is
        accepted. Returns the final loss."""
        variables = list(variables)
        loss = None
        for _ in range(int(iterations)):
            with tf.GradientTape() as tape:
                loss = loss_fn()
            gradients = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if float(_global_sq_norm(gradients)) ** 0.5 <= gradient_tolerance:
                return float(loss)
            loss, accepted, _ = backtracking_line_search(loss_fn, variables, gradients, loss, self.parameters,
                                                         self.scaling_factor)
            if not accepted:
                break
        return float(loss_fn()) if loss is None else float(loss)

    def get_config(self) -> dict:
        """Constructor arguments and current state."""
        return {"batches_per_epoch": self.batches_per_epoch, "scaling_factor": self.scaling_factor,
                "beta": self.parameters.beta, "gamma": self.parameters.gamma, "eta": self.parameters.eta,
                "max_eta": self.parameters.max_eta, "min_eta": self.parameters.min_eta,
                "max_backtracks": self.parameters.max_backtracks}
