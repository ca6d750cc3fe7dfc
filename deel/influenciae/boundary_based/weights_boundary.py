"""Distance to the decision boundary in weight space (DeepFool on the weights), as a self-influence score.

For a sample x of predicted class ``c0`` (the label is ignored) and the flat vector θ of all trainable weights of
the model, DeepFool moves θ (not x) until the prediction of x changes::

    Δf_k = |f_k(x; θ') − f_c0(x; θ')|,   w_k = ∇_θ f_k(x; θ') − ∇_θ f_c0(x; θ'),
    k* = argmin_{k ≠ c0} Δf_k / ‖w_k‖_p,   θ' ← θ' + (Δf_k* / ‖w_k*‖_p^p) · |w_k*|^(p−1) · sign(w_k*)

(p = ``norm_type``; for p = 2 the step is ``Δf/‖w‖² · w``), with the same stopping rules as the input-space
variant. The score is the **negative p-norm distance** ``−‖θ − θ'‖_p`` (not raised to any power).
"""
import inspect
import math
from typing import List, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..common.base_influence import SelfInfluenceCalculator
from ..common.derivatives import values_and_jacobian
from .sample_boundary import as_float_inputs, check_class_count, check_classifier, deepfool_direction, \
    still_on_origin_side

# Samples are independent (the weights are never written), so a few of them may run concurrently.
_PARALLEL_SAMPLES = 8


class WeightsBoundaryCalculator(SelfInfluenceCalculator):
    """Self-influence as minus the DeepFool distance, in weight space, of each sample to the decision boundary.

    Every sample gets its own trajectory of the weights, so the attack runs one sample at a time (a
    ``tf.map_fn`` over the batch, each sample a ``tf.while_loop`` of DeepFool steps, all in one compiled
    ``tf.function``); a step costs one forward pass and one Jacobian (C, P) of the class scores with respect to
    the P trainable weights. Batching samples would need B copies of the weights and a (B, C, P) Jacobian.

    The model's variables are **never modified**: the moved weights are plain tensors fed to
    ``model.stateless_call``, so an exception raised mid-way (or a computation abandoned inside a
    ``tf.data`` pipeline) cannot leave the model altered.

    Parameters
    ----------
    model
        A trained Keras classifier with a single input and C >= 2 class scores per sample. Every trainable
        weight is moved; the non-trainable ones (e.g. batch-norm statistics) are kept.
    step_nbr
        Maximum number of DeepFool steps per sample.
    norm_type
        The p >= 1 of the p-norm used to choose the boundary, to step and to measure the distance.
    eps
        A sample stops once the gap between its two largest class scores is at most ``eps``.

    Notes
    -----
    The score is ``−‖θ − θ_adv‖_p`` over all trainable weights, shape (B, 1); larger means closer to the
    boundary. A sample whose class scores all have the same gradient keeps the distance travelled so far.
    """

    def __init__(self, model: keras.Model, step_nbr: int = 100, norm_type: float = 2, eps: float = 1e-6):
        check_classifier(model, step_nbr, eps)
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float, np.integer, np.floating)) \
                or not 1 <= norm_type < math.inf:
            raise ValueError(f"norm_type must be a finite number >= 1, got {norm_type!r}.")
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError("The model has no trainable weight to move.")
        dtypes = {tf.as_dtype(variable.dtype) for variable in variables}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating:
            raise ValueError("All trainable weights must share one floating dtype, got "
                             f"{sorted(d.name for d in dtypes)}.")
        self.model = model
        self.step_nbr = step_nbr
        self.norm_type = float(norm_type)
        self.eps = float(eps)
        self.dtype = dtypes.pop()
        self._shapes = [tuple(int(d) for d in variable.shape) for variable in variables]
        self._sizes = [int(np.prod(shape)) for shape in self._shapes]
        # stateless_call hands its keyword arguments to ``call`` as they are: only pass ``training`` if accepted.
        parameters = inspect.signature(model.call).parameters
        accepts_training = "training" in parameters or any(parameter.kind == inspect.Parameter.VAR_KEYWORD
                                                           for parameter in parameters.values())
        self._call_kwargs = {"training": False} if accepts_training else {}
        self._distances = tf.function(self._distances_eager, reduce_retracing=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Minus the weight-space DeepFool distance of each sample of the batch: (B, 1)."""
        inputs = as_float_inputs(train_samples[0], tf.as_dtype(self.model.compute_dtype))
        return -tf.expand_dims(self._distances(inputs), axis=1)

    def _flat_weights(self) -> tf.Tensor:
        """Current trainable weights, flattened row-major and concatenated: (P,)."""
        return tf.concat([tf.reshape(tf.convert_to_tensor(variable.value), [-1])
                          for variable in self.model.trainable_variables], axis=0)

    def _unflatten(self, theta: tf.Tensor) -> List[tf.Tensor]:
        return [tf.reshape(part, shape) for part, shape in zip(tf.split(theta, self._sizes), self._shapes)]

    def _scores_at(self, theta: tf.Tensor, point: tf.Tensor) -> tf.Tensor:
        """Class scores (1, C) of one sample ``point`` (1, *x_shape) with the weights θ (P,)."""
        non_trainable = [variable.value for variable in self.model.non_trainable_variables]
        scores, _ = self.model.stateless_call(self._unflatten(theta), non_trainable, point, **self._call_kwargs)
        scores = tf.reshape(scores, [1, -1])
        check_class_count(scores.shape)
        return tf.cast(scores, theta.dtype)

    def _norm(self, tensor: tf.Tensor) -> tf.Tensor:
        """p-norm along the last axis."""
        return tf.norm(tensor, ord=self.norm_type, axis=-1)

    def _step(self, theta: tf.Tensor, point: tf.Tensor, origin: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """One DeepFool step on the weights for one sample: new θ (P,), still active (scalar bool)."""
        first, jacobian = values_and_jacobian(lambda weights: self._scores_at(weights, point)[0], theta)  # (C, P)
        scores = first[None]
        delta, w, norm, movable = deepfool_direction(scores, jacobian[None], origin, self._norm)
        active = tf.logical_and(still_on_origin_side(scores, origin, self.eps), movable)[0]
        p = tf.constant(self.norm_type, theta.dtype)
        safe_norm = tf.where(active, norm[0], tf.ones_like(norm[0]))
        update = delta[0] / safe_norm ** p * tf.pow(tf.abs(w[0]), p - 1) * tf.sign(w[0])
        return tf.where(active, theta + update, theta), active

    def _distance_one(self, point: tf.Tensor, theta: tf.Tensor) -> tf.Tensor:
        """p-norm distance (scalar) the weights travel before the prediction of one sample (*x_shape) flips."""
        point = tf.expand_dims(point, 0)
        origin = tf.argmax(self._scores_at(theta, point), axis=1, output_type=tf.int32)

        def keep_going(step, _, active):
            return tf.logical_and(step < self.step_nbr, active)

        def one_step(step, moved, _):
            moved, active = self._step(moved, point, origin)
            return step + 1, moved, active

        _, moved, _ = tf.while_loop(keep_going, one_step, (tf.constant(0), theta, tf.constant(True)))
        return self._norm(moved - theta)

    def _distances_eager(self, inputs: tf.Tensor) -> tf.Tensor:
        """Weight-space distance of each input: (B,)."""
        theta = self._flat_weights()
        return tf.map_fn(lambda point: self._distance_one(point, theta), inputs,
                         fn_output_signature=tf.TensorSpec([], theta.dtype), parallel_iterations=_PARALLEL_SAMPLES)
