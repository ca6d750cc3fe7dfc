"""Compiled derivative kernels of a per-sample loss with respect to a flat vector of watched weights.

Gradient tapes live here (the model's loss), in :mod:`.derivatives` (plain functions: RPS-L2's surrogate objective,
the boundary methods' scores), in the per-layer factor kernels and in the Gauss–Newton kernels (:mod:`.gauss_newton`,
built on :meth:`LossKernels.outputs_of` and :meth:`LossKernels.losses_of_outputs`). A :class:`LossKernels` object turns
(model, watched variables, loss) into pure functions of a flat parameter vector θ (length P), evaluated
with ``model.stateless_call`` so that θ can be differentiated freely, and exposes compiled kernels:

* ``per_sample_losses(batch) -> (B,)``
* ``per_sample_gradients(batch) -> (B, P)``: vectorized over the batch (``tf.vectorized_map``)
* ``summed_gradient(batch) -> (P,)``: gradient of the batch's summed loss
* ``summed_hessian(batch) -> (P, P)``: Hessian of the batch's summed loss (never a (B, P, P) tensor)
* ``summed_hvp(batch, vectors (P, K)) -> (P, K)``: Hessian of the summed loss times K vectors

θ is read from the variables on every call, so the kernels always see the current weights.
"""
import functools
import inspect
import logging
from typing import Any, Callable, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from .gradient_overrides import cheap_second_derivatives
from .pfor_converters import vectorized_per_sample


def _accepts_training(model: keras.Model) -> bool:
    """Whether ``model.call`` takes a ``training`` argument (subclassed models may not)."""
    try:
        parameters = inspect.signature(model.call).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "training" or p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


# Classes whose compiled kernels are one per instance (models, checkpoints, heads, fitted solvers).
_OWNERS = ("LossKernels.", "KFACIHVP.")


class _OwnKernelRetracingFilter(logging.Filter):
    """Drop TensorFlow's "excessive retracing" warning when it is about these kernels.

    Every ``LossKernels`` (one per model, checkpoint or head) compiles its own kernels by design, and a short last
    batch adds one trace each; TensorFlow's heuristic counts the traces of all instances together and warns,
    although nothing is retraced needlessly. Warnings about any other function pass through unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and any(owner in message for owner in _OWNERS))


tf.get_logger().addFilter(_OwnKernelRetracingFilter())


def traced_with_overrides(function: Callable) -> Callable:
    """``function`` running under :func:`cheap_second_derivatives` (so, once compiled, only while it is traced)."""

    @functools.wraps(function)
    def traced(*args: Any) -> Any:
        with cheap_second_derivatives():
            return function(*args)

    return traced


class _Compiled:
    """``tf.function`` of a kernel, traced without AutoGraph (it needs none, and tracing is ~40 % faster); if the
    user's model or loss needs AutoGraph (Python control flow on tensors), it is traced again with it. Tracing
    runs under :func:`~.gradient_overrides.cheap_second_derivatives`."""

    def __init__(self, function: Callable):
        function = traced_with_overrides(function)
        self._plain = tf.function(function, reduce_retracing=True, autograph=False)
        self._autograph = tf.function(function, reduce_retracing=True)
        self._use_autograph = False

    def __call__(self, *args: Any) -> Any:
        if not self._use_autograph:
            try:
                return self._plain(*args)
            except (tf.errors.OperatorNotAllowedInGraphError, TypeError, NotImplementedError):
                self._use_autograph = True
        return self._autograph(*args)


def compile_function(function: Callable) -> Callable:
    """Compile ``function`` with ``tf.function`` (reduced retracing), without AutoGraph unless it needs it."""
    return _Compiled(function)


class LossKernels:  # pylint: disable=too-many-instance-attributes
    """Derivatives of ``loss(y, model(x), sample_weight)`` with respect to the watched variables.

    Parameters
    ----------
    model
        A built Keras 3 model.
    watched
        The variables to differentiate against (each must be a variable of ``model``); they must share one
        floating dtype.
    loss_function
        Per-sample (un-reduced) loss ``f(y_true, y_pred[, sample_weight]) -> (B,)`` (trailing dimensions, if
        any, are summed per sample).
    process_batch
        Maps a dataset element (a tuple) to ``(inputs, targets, sample_weight or None)``.
    """

    def __init__(self, model: keras.Model, watched: Sequence[Any], loss_function: Callable,
                 process_batch: Callable):
        self.model = model
        self.watched = list(watched)
        self.loss_function = loss_function
        self.process_batch = process_batch
        positions = {id(variable): position for position, variable in enumerate(self.watched)}
        model_variables = {id(variable) for variable in model.variables}
        missing = [variable.path for variable in self.watched if id(variable) not in model_variables]
        if missing:
            raise ValueError(f"These watched weights are not weights of the model: {missing}.")
        self._trainable_slots = [positions.get(id(variable)) for variable in model.trainable_variables]
        self._non_trainable_slots = [positions.get(id(variable)) for variable in model.non_trainable_variables]
        dtypes = {tf.as_dtype(variable.dtype) for variable in self.watched}
        if len(dtypes) != 1:
            raise ValueError(f"All watched weights must share one dtype, got {sorted(d.name for d in dtypes)}.")
        self.dtype = dtypes.pop()
        if not self.dtype.is_floating:
            raise ValueError(f"Watched weights must be floating point, got {self.dtype.name}.")
        self.shapes = [tuple(int(d) for d in variable.shape) for variable in self.watched]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.nb_params = int(sum(self.sizes))
        if self.nb_params == 0:
            raise ValueError("The watched weights hold no parameter.")
        # Inference mode (dropout off, BatchNorm statistics frozen) for models whose call() takes `training`.
        self._call_kwargs = {"training": False} if _accepts_training(model) else {}
        self.per_sample_losses = compile_function(self._per_sample_losses_eager)
        self.per_sample_gradients = compile_function(self._per_sample_gradients_eager)
        self.summed_gradient = compile_function(self._summed_gradient_eager)
        self.summed_hessian = compile_function(self._summed_hessian_eager)
        self.summed_hvp = compile_function(self._summed_hvp_eager)
        self.chunked_mean_hvp = compile_function(self.chunked_mean_hvp_eager)

    # ---------------------------------------------------------------------------------------------
    # θ and the functional loss
    # ---------------------------------------------------------------------------------------------
    def flat_weights(self) -> tf.Tensor:
        """Current values of the watched weights, flattened row-major and concatenated: (P,)."""
        return tf.concat([tf.reshape(tf.convert_to_tensor(variable.value), [-1]) for variable in self.watched], 0)

    def unflatten(self, theta: tf.Tensor) -> List[tf.Tensor]:
        """Split a flat (P,) vector into tensors shaped like the watched weights."""
        parts = tf.split(theta, self.sizes)
        return [tf.reshape(part, shape) for part, shape in zip(parts, self.shapes)]

    def _losses_at(self, theta: tf.Tensor, inputs: Any, targets: Any, sample_weight: Any) -> tf.Tensor:
        return self.losses_of(self.unflatten(theta), inputs, targets, sample_weight)

    def losses_of(self, values: List[tf.Tensor], inputs: Any, targets: Any, sample_weight: Any) -> tf.Tensor:
        """Per-sample losses (B,) with the watched weights replaced by ``values`` (shaped like the weights)."""
        return self.losses_of_outputs(targets, self.outputs_of(values, inputs), sample_weight)

    def outputs_of(self, values: List[tf.Tensor], inputs: Any) -> Any:
        """The model's outputs on ``inputs`` (batch first, as the model returns them) with the watched weights
        replaced by ``values`` (shaped like the weights); the other weights keep their current values."""

        def pick(variables, slots):
            return [values[slot] if slot is not None else variable.value for variable, slot in zip(variables, slots)]

        outputs, _ = self.model.stateless_call(pick(self.model.trainable_variables, self._trainable_slots),
                                               pick(self.model.non_trainable_variables, self._non_trainable_slots),
                                               inputs, **self._call_kwargs)
        return outputs

    def losses_of_outputs(self, targets: Any, outputs: Any, sample_weight: Any) -> tf.Tensor:
        """Per-sample losses (B,) of given model outputs: ``loss_function(targets, outputs[, sample_weight])``, with
        trailing dimensions summed per sample.

        Raises
        ------
        ValueError
            If the loss returns one value for the whole batch.
        """
        if sample_weight is None:
            losses = self.loss_function(targets, outputs)
        else:
            losses = self.loss_function(targets, outputs, sample_weight)
        losses = tf.convert_to_tensor(losses)
        if losses.shape.rank == 0:
            raise ValueError("loss_function returned one value for the whole batch: it must return one loss per "
                             "sample (use reduction=None / 'none' for Keras losses).")
        if losses.shape.rank > 1:
            losses = tf.reduce_sum(tf.reshape(losses, tf.stack([tf.shape(losses)[0], -1])), axis=1)
        return losses

    def _split(self, batch: Tuple) -> Tuple[Any, Any, Any]:
        return self.process_batch(batch)

    # ---------------------------------------------------------------------------------------------
    # Kernels (wrapped in tf.function in __init__)
    # ---------------------------------------------------------------------------------------------
    def _per_sample_losses_eager(self, batch: Tuple) -> tf.Tensor:
        inputs, targets, sample_weight = self._split(batch)
        return self._losses_at(self.flat_weights(), inputs, targets, sample_weight)

    def _gradient_at(self, theta: tf.Tensor, inputs: Any, targets: Any, sample_weight: Any) -> tf.Tensor:
        """Gradient at θ of the summed loss of the given samples: (P,). Differentiable again (outer tapes)."""
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = tf.reduce_sum(self._losses_at(theta, inputs, targets, sample_weight))
        return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _per_sample_gradients_eager(self, batch: Tuple) -> tf.Tensor:
        inputs, targets, sample_weight = self._split(batch)
        theta = self.flat_weights()

        def one_sample(sample):
            sample = tf.nest.map_structure(lambda tensor: tf.expand_dims(tensor, 0), sample)
            inputs_i, targets_i, weight_i = sample if len(sample) == 3 else (*sample, None)
            return self._gradient_at(theta, inputs_i, targets_i, weight_i)

        samples = (inputs, targets) if sample_weight is None else (inputs, targets, sample_weight)
        return vectorized_per_sample(one_sample, samples)

    def _summed_gradient_eager(self, batch: Tuple) -> tf.Tensor:
        return self._gradient_at(self.flat_weights(), *self._split(batch))

    def _summed_hessian_eager(self, batch: Tuple) -> tf.Tensor:
        theta = self.flat_weights()
        with tf.GradientTape() as outer:
            outer.watch(theta)
            gradient = self._gradient_at(theta, *self._split(batch))
        # A loop of P backward passes: faster than pfor here (benchmarks/README.md, "Design measurements").
        return outer.jacobian(gradient, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                              experimental_use_pfor=False)

    def _summed_hvp_eager(self, batch: Tuple, vectors: tf.Tensor) -> tf.Tensor:
        theta = self.flat_weights()
        vectors = tf.cast(vectors, theta.dtype)
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(theta)
            gradient = self._gradient_at(theta, *self._split(batch))
        # One backward pass of the gradient per column, H v_k = d(v_kᵀ g)/dθ, in a loop: faster than vectorizing the
        # K columns with pfor (benchmarks/README.md, "Design measurements") and its memory is that of one backward
        # pass instead of K.
        return map_columns(lambda vector: outer.gradient(gradient, theta, output_gradients=vector,
                                                         unconnected_gradients=tf.UnconnectedGradients.ZERO),
                           vectors, theta)

    def chunked_mean_hvp_eager(self, samples: Tuple, vectors: tf.Tensor, chunk_size: tf.Tensor) -> tf.Tensor:
        """Mean over ``samples`` (a batch held in memory, N samples) of the Hessian times ``vectors`` (P, K),
        walking the samples in chunks of ``chunk_size`` inside one loop: (P, K). Compiled as
        ``chunked_mean_hvp`` (one trace per LossKernels, whatever dataset or solver calls it)."""
        return chunked_mean(self._summed_hvp_eager, samples, tf.cast(vectors, self.dtype), chunk_size)


def map_columns(product: Callable[[tf.Tensor], tf.Tensor], vectors: tf.Tensor, theta: tf.Tensor) -> tf.Tensor:
    """``[product(v_1), …, product(v_K)]`` for (P, K) vectors, one column at a time in a ``tf.while_loop``: (P, K).
    ``product`` maps a (P,) column to a (P,) vector shaped and typed like ``theta``."""
    count = tf.shape(vectors)[1]

    def column(index, products):
        return index + 1, products.write(index, product(vectors[:, index]))

    products = tf.TensorArray(theta.dtype, size=count, element_shape=theta.shape)
    _, products = tf.while_loop(lambda index, _: index < count, column, (tf.constant(0), products))
    return tf.ensure_shape(tf.transpose(products.stack()), vectors.shape)


def chunked_mean(summed: Callable[[Tuple, tf.Tensor], tf.Tensor], samples: Tuple, vectors: tf.Tensor,
                 chunk_size: tf.Tensor) -> tf.Tensor:
    """Mean over ``samples`` (a batch held in memory, N samples) of ``summed(chunk, vectors)`` (a sum over the
    chunk's samples, (P, K)), walking the samples in chunks of ``chunk_size`` inside one ``tf.while_loop``: (P, K)."""
    nb_samples = tf.shape(tf.nest.flatten(samples)[0])[0]

    def body(start, total):
        chunk = tf.nest.map_structure(lambda tensor: tensor[start:start + chunk_size], samples)
        return start + chunk_size, total + summed(chunk, vectors)

    _, total = tf.while_loop(lambda start, _: start < nb_samples, body, (tf.constant(0), tf.zeros_like(vectors)))
    return total / tf.cast(nb_samples, vectors.dtype)
