"""Distance to the decision boundary in input space (DeepFool), as a self-influence score.

For a classifier with class scores ``f(x) ∈ R^C`` and a sample x of predicted class ``c0 = argmax f(x)`` (the
label is ignored), DeepFool (Moosavi-Dezfooli et al., 2016) linearises ``f`` around the current point ``x'`` and
jumps onto the nearest linearised boundary::

    Δf_k = |f_k(x') − f_c0(x')|,   w_k = ∇ₓf_k(x') − ∇ₓf_c0(x'),   k* = argmin_{k ≠ c0} Δf_k / ‖w_k‖₂
    x' ← x' + (Δf_k* / ‖w_k*‖₂²) · w_k*                                (no overshoot)

while the prediction is still ``c0``, the margin between the two largest scores exceeds ``eps`` and fewer than
``step_nbr`` steps were made. The score is the **negative L2 distance** ``−‖x − x'‖₂`` (not squared): samples
close to the boundary get the largest scores.
"""
from typing import Any, Callable, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..common.base_influence import SelfInfluenceCalculator
from ..common.derivatives import values_and_input_jacobians


def check_classifier(model: Any, step_nbr: int, eps: float) -> None:
    """Validate the arguments shared by the boundary calculators.

    Raises
    ------
    TypeError
        If ``model`` is not a Keras model or ``step_nbr`` is not an integer.
    ValueError
        If ``step_nbr < 1``, ``eps < 0``, or the model is known to have fewer than two outputs.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    if isinstance(step_nbr, bool) or not isinstance(step_nbr, (int, np.integer)):
        raise TypeError(f"step_nbr must be an integer, got {step_nbr!r}.")
    if step_nbr < 1:
        raise ValueError(f"step_nbr must be >= 1, got {step_nbr}.")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}.")
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1:
        check_class_count(outputs[0].shape)


def check_class_count(output_shape: tf.TensorShape) -> int:
    """Number of class scores per sample (product of the non-batch dimensions); ValueError if it is below 2."""
    dims = tf.TensorShape(output_shape)[1:]
    if dims.is_fully_defined():
        classes = dims.num_elements()
        if classes < 2:
            raise ValueError(f"Boundary-based scores need a classifier with at least 2 outputs (class scores); the "
                             f"model has {classes}. Use two logits instead of one sigmoid output.")
        return classes
    return -1


def as_float_inputs(inputs: Any, dtype: tf.DType) -> tf.Tensor:
    """The inputs of a batch as one floating tensor (integer images are cast to ``dtype``)."""
    if isinstance(inputs, (dict, list, tuple)):
        raise TypeError("Boundary-based scores support models with a single input tensor.")
    inputs = tf.convert_to_tensor(inputs)
    return inputs if inputs.dtype.is_floating else tf.cast(inputs, dtype)


def deepfool_direction(scores: tf.Tensor, gradients: tf.Tensor, origin: tf.Tensor,
                       norms: Callable[[tf.Tensor], tf.Tensor]
                       ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Choose, for each row, the nearest linearised boundary.

    Parameters
    ----------
    scores
        Class scores at the current points: (B, C).
    gradients
        Their derivatives, flattened: (B, C, D).
    origin
        Reference class of each row: (B,) int.
    norms
        Callable mapping differences of gradients (B, C, D) to their norms (B, C).

    Returns
    -------
    delta, w, norm, movable
        ``delta`` (B,) = Δf_k*, ``w`` (B, D) = w_k*, ``norm`` (B,) = ‖w_k*‖ (in the norm given by ``norms``),
        ``movable`` (B,) bool: a finite direction exists.
    """
    f_origin = tf.gather(scores, origin, batch_dims=1)                      # (B,)
    g_origin = tf.gather(gradients, origin, batch_dims=1)                   # (B, D)
    delta = tf.abs(scores - f_origin[:, None])                              # (B, C)
    w = gradients - g_origin[:, None, :]                                    # (B, C, D)
    w_norm = norms(w)                                                        # (B, C)
    classes = tf.shape(scores)[1]
    valid = tf.logical_and(tf.logical_not(tf.cast(tf.one_hot(origin, classes), tf.bool)), w_norm > 0)
    ratio = tf.where(valid, delta / tf.where(valid, w_norm, tf.ones_like(w_norm)),
                     tf.fill(tf.shape(w_norm), tf.constant(float("inf"), w_norm.dtype)))
    best = tf.argmin(ratio, axis=1, output_type=tf.int32)                   # (B,)
    movable = tf.math.is_finite(tf.reduce_min(ratio, axis=1))
    return (tf.gather(delta, best, batch_dims=1), tf.gather(w, best, batch_dims=1),
            tf.gather(w_norm, best, batch_dims=1), movable)


def still_on_origin_side(scores: tf.Tensor, origin: tf.Tensor, eps: float) -> tf.Tensor:
    """(B,) bool: the prediction is still ``origin`` and the top-2 margin exceeds ``eps``."""
    top2 = tf.math.top_k(scores, k=2).values
    same = tf.equal(tf.argmax(scores, axis=1, output_type=tf.int32), origin)
    return tf.logical_and(same, top2[:, 0] - top2[:, 1] > tf.cast(eps, scores.dtype))


class SampleBoundaryCalculator(SelfInfluenceCalculator):
    """Self-influence as minus the DeepFool distance of each sample to the decision boundary, in input space.

    The whole batch is attacked at once inside one compiled ``tf.function``: a ``tf.while_loop`` over DeepFool
    steps keeps a per-sample "still active" mask, and each step only evaluates the samples still active
    (gathered, then scattered back), with their input Jacobians computed by ``GradientTape.batch_jacobian``.
    This assumes the model treats samples independently in inference mode (``training=False``), as every
    standard classifier does.

    Parameters
    ----------
    model
        A trained Keras classifier with a single input and C >= 2 class scores per sample (logits or
        probabilities; non-batch output dimensions are flattened). Its weights are never modified.
    step_nbr
        Maximum number of DeepFool steps per sample.
    eps
        A sample stops once the gap between its two largest class scores is at most ``eps``.

    Notes
    -----
    Labels are ignored: the reference class is the model's own prediction. The score is ``−‖x − x_adv‖₂``
    (plain L2 distance, not squared), shape (B, 1); larger means closer to the boundary. A sample whose class
    scores all have the same gradient cannot move and keeps the distance travelled so far.
    """

    def __init__(self, model: keras.Model, step_nbr: int = 100, eps: float = 1e-6):
        check_classifier(model, step_nbr, eps)
        self.model = model
        self.step_nbr = int(step_nbr)
        self.eps = float(eps)
        self._distances = tf.function(self._distances_eager, reduce_retracing=True)
        self._attack_compiled = tf.function(self._attack, reduce_retracing=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Minus the DeepFool distance of each sample of the batch: (B, 1)."""
        inputs = as_float_inputs(train_samples[0], tf.as_dtype(self.model.compute_dtype))
        return -tf.expand_dims(self._distances(inputs), axis=1)

    def compute_adversarial_examples(self, inputs: tf.Tensor) -> tf.Tensor:
        """Points where DeepFool stops for a batch of inputs: (B, *x_shape)."""
        inputs = as_float_inputs(inputs, tf.as_dtype(self.model.compute_dtype))
        return self._attack_compiled(inputs)

    def _scores(self, inputs: tf.Tensor) -> tf.Tensor:
        scores = self.model(inputs, training=False)
        scores = tf.reshape(scores, tf.stack([tf.shape(scores)[0], -1]))
        check_class_count(scores.shape)
        return tf.cast(scores, inputs.dtype)

    def _step(self, points: tf.Tensor, origin: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """One DeepFool step for a batch of active points: new points (B, *x_shape), still active (B,)."""
        scores, jacobian = values_and_input_jacobians(self._scores, points)  # (B, C), (B, C, *x_shape)
        jacobian = tf.reshape(jacobian, tf.stack([tf.shape(jacobian)[0], tf.shape(jacobian)[1], -1]))
        delta, w, norm, movable = deepfool_direction(scores, jacobian, origin,
                                                     lambda w: tf.norm(w, axis=-1))
        active = tf.logical_and(still_on_origin_side(scores, origin, self.eps), movable)
        coefficient = tf.where(active, delta / tf.where(active, norm, tf.ones_like(norm)) ** 2,
                               tf.zeros_like(norm))
        moves = tf.reshape(coefficient[:, None] * w, tf.shape(points))
        return points + moves, active

    def _attack(self, inputs: tf.Tensor) -> tf.Tensor:
        origin = tf.argmax(self._scores(inputs), axis=1, output_type=tf.int32)
        batch = tf.shape(inputs)[0]

        def keep_going(step, _, active):
            return tf.logical_and(step < self.step_nbr, tf.reduce_any(active))

        def one_step(step, points, active):
            # Only the samples still active are evaluated: the cost follows the sum of their step counts.
            indices = tf.where(active)
            new_points, new_active = self._step(tf.gather_nd(points, indices), tf.gather_nd(origin, indices))
            points = tf.tensor_scatter_nd_update(points, indices, new_points)
            active = tf.tensor_scatter_nd_update(active, indices, new_active)
            return step + 1, points, active

        _, points, _ = tf.while_loop(keep_going, one_step, (tf.constant(0), inputs, tf.ones([batch], tf.bool)))
        return points

    def _distances_eager(self, inputs: tf.Tensor) -> tf.Tensor:
        """L2 distance from each input to where DeepFool stops: (B,)."""
        moves = self._attack(inputs) - inputs
        return tf.norm(tf.reshape(moves, tf.stack([tf.shape(moves)[0], -1])), axis=1)
