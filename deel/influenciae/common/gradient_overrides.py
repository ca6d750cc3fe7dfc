"""Cheaper second derivatives of TensorFlow's fused softmax cross-entropy ops.

Keras' cross-entropies with ``from_logits=True`` run on TensorFlow's fused ``SoftmaxCrossEntropyWithLogits`` and
``SparseSoftmaxCrossEntropyWithLogits`` ops. Their registered gradient returns the op's second output
(``softmax(z) - y``); differentiating that gradient again (Hessians, Hessian-vector products) goes back through the
fused op's own gradient, which recomputes the softmax and contracts it with a batch of (1, C) x (C, 1) matrix
products. In the P-iteration loop of an exact Hessian this about doubles the cost (figures in benchmarks/README.md,
"Design measurements").

While our kernels are traced (:func:`cheap_second_derivatives`), the two gradients are replaced by ones with the
same values whose own derivative goes through ``softmax`` only: the backward value is written
``stop_gradient(p - y) + (p - stop_gradient(p))`` with ``p = softmax(z)``, so the second derivative with respect
to the logits is the softmax Jacobian ``diag(p) - p pᵀ`` (the exact Hessian of the cross-entropy), applied as an
element-wise product and a row sum. The gradient with respect to dense labels is TensorFlow's
``-log_softmax(z)``, and, as in TensorFlow, the second-order terms through the labels are not formed.

The first-order value itself is computed without the cancellation of ``p_y - 1`` that the fused op suffers when a
sample is classified confidently (``1 - p_y`` below float32's spacing near 1, 6e-8): see
:func:`_precise_difference`. Gradients of such samples then keep their relative precision (they matter when a
small damping amplifies small curvature directions, e.g. K-FAC on a model that fits its training set).

This relies on TensorFlow's private gradient registry; if it is not found in the expected form, nothing is changed.
"""
import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import tensorflow as tf

try:  # private TensorFlow API: used only if present, in the form checked below
    from tensorflow.python.framework import ops as _ops  # pylint: disable=no-name-in-module
except ImportError:  # pragma: no cover - depends on the TensorFlow build
    _ops = None


def _is_zero(gradient: Optional[tf.Tensor]) -> bool:
    """Whether an incoming gradient is absent or TensorFlow's symbolic zero."""
    return gradient is None or bool(getattr(gradient, "_is_zeros_tensor", False))


def _labels_of(op: Any, probabilities: tf.Tensor) -> tf.Tensor:
    """The op's labels as (B, C) rows: the tape does not keep inputs that TensorFlow's own gradient does not use, so
    they are read back from the second output, ``y ≈ p - (softmax(z) - y)`` (entries within 1e-6 of 0 or 1 are
    snapped to it: one-hot rows are recovered exactly)."""
    estimate = probabilities - op.outputs[1]
    snapped = tf.where(tf.abs(estimate) < 1e-6, tf.zeros_like(estimate), estimate)
    return tf.where(tf.abs(snapped - 1.0) < 1e-6, tf.ones_like(snapped), snapped)


def _precise_difference(probabilities: tf.Tensor, labels: tf.Tensor, sparse: bool) -> tf.Tensor:
    """``p - y`` without the cancellation of ``p_k - 1`` when ``p_k`` is close to 1 (B, C).

    For a confidently classified sample, ``1 - p_y`` is below the spacing of floats near 1 (6e-8 in float32), so
    the fused op's ``softmax(z) - y`` rounds it to 0 or a multiple of 6e-8 while the other entries ``p_c`` keep their
    relative precision. Here ``p_k - y_k = p_k (1 - y_k) - y_k (1 - p_k)`` (rows of y sum to 1) with
    ``1 - p_k = Σ_{j≠k} p_j`` summed directly for the most probable class (the only one that can be close to 1).
    """
    if sparse:
        is_label = tf.one_hot(tf.argmax(labels, axis=-1), tf.shape(probabilities)[-1], on_value=True, off_value=False)
        others = tf.reduce_sum(tf.where(is_label, tf.zeros_like(probabilities), probabilities), -1, keepdims=True)
        return tf.where(is_label, -others, probabilities)
    labels = tf.cast(labels, probabilities.dtype)
    is_top = tf.one_hot(tf.argmax(probabilities, axis=-1), tf.shape(probabilities)[-1], on_value=True,
                        off_value=False)
    others = tf.reduce_sum(tf.where(is_top, tf.zeros_like(probabilities), probabilities), -1, keepdims=True)
    complement = tf.where(is_top, others + tf.zeros_like(probabilities), 1.0 - probabilities)
    return probabilities * (1.0 - labels) - labels * complement


def _logits_gradient(op: Any, grad_loss: tf.Tensor, grad_backprop: Optional[tf.Tensor]) -> tf.Tensor:
    """Gradient with respect to the logits (B, C), differentiable again through ``softmax`` only; its value is
    ``softmax(z) - y`` computed without cancellation (:func:`_precise_difference`)."""
    logits = op.inputs[0]
    probabilities = tf.nn.softmax(logits)
    difference = _precise_difference(probabilities, _labels_of(op, probabilities), sparse=op.type.startswith("Sparse"))
    # Value: the precise softmax(z) - y (p - stop_gradient(p) is exactly 0); derivative: through softmax only.
    backprop = tf.stop_gradient(difference) + (probabilities - tf.stop_gradient(probabilities))
    gradient = tf.expand_dims(grad_loss, -1) * backprop
    if not _is_zero(grad_backprop):
        # Backward pass of the second output softmax(z) - y: the softmax Jacobian (diag p - p pᵀ) times grad_backprop.
        gradient += (grad_backprop - tf.reduce_sum(grad_backprop * probabilities, -1, keepdims=True)) * probabilities
    return gradient


def _dense_labels_gradient(op: Any, grad_loss: tf.Tensor, grad_backprop: Optional[tf.Tensor]
                           ) -> Tuple[tf.Tensor, tf.Tensor]:
    """``SoftmaxCrossEntropyWithLogits``: gradients with respect to the logits and the (dense) labels."""
    return (_logits_gradient(op, grad_loss, grad_backprop),
            tf.expand_dims(grad_loss, -1) * -tf.nn.log_softmax(op.inputs[0]))


def _sparse_labels_gradient(op: Any, grad_loss: tf.Tensor, grad_backprop: Optional[tf.Tensor]
                            ) -> Tuple[tf.Tensor, None]:
    """``SparseSoftmaxCrossEntropyWithLogits``: gradient with respect to the logits (integer labels have none)."""
    return _logits_gradient(op, grad_loss, grad_backprop), None


_REPLACEMENTS: Dict[str, Callable] = {
    "SoftmaxCrossEntropyWithLogits": _dense_labels_gradient,
    "SparseSoftmaxCrossEntropyWithLogits": _sparse_labels_gradient,
}


def _gradient_registry() -> Optional[dict]:
    """TensorFlow's op-type -> gradient-function table, if it has the expected form."""
    registry = getattr(getattr(_ops, "_gradient_registry", None), "_registry", None)
    if not isinstance(registry, dict):
        return None
    entries = [registry.get(op_type) for op_type in _REPLACEMENTS]
    if not all(isinstance(entry, dict) and "type" in entry for entry in entries):
        return None
    return registry


@contextlib.contextmanager
def cheap_second_derivatives() -> Iterator[None]:
    """Within the block, gradients of the fused softmax cross-entropy ops are built in the form whose own
    derivative is cheap (see the module docstring); TensorFlow's are restored on exit."""
    registry = _gradient_registry()
    if registry is None:
        yield
        return
    originals = {op_type: registry[op_type] for op_type in _REPLACEMENTS}
    for op_type, gradient_function in _REPLACEMENTS.items():
        registry[op_type] = dict(originals[op_type], type=gradient_function)
    try:
        yield
    finally:
        registry.update(originals)
