"""Cheaper second derivatives of TensorFlow's fused softmax cross-entropy ops.

Keras' cross-entropies with ``from_logits=True`` run on TensorFlow's fused ``SoftmaxCrossEntropyWithLogits`` and
``SparseSoftmaxCrossEntropyWithLogits`` ops. Their registered gradient returns the op's second output
(``softmax(z) - y``); differentiating that gradient again (Hessians, Hessian-vector products) goes back through the
fused op's own gradient, which recomputes the softmax and contracts it with a batch of (1, C) x (C, 1) matrix
products. In the P-iteration loop of an exact Hessian this about doubles the cost (figures in benchmarks/README.md,
"Design measurements").

While our kernels are traced (:func:`cheap_second_derivatives`), the two gradients are replaced by ones with the
same values whose own derivative goes through ``softmax`` only: the backward value is written
``p + stop_gradient(backprop - p)`` with ``p = softmax(z)``, so the second derivative with respect to the logits is
the softmax Jacobian ``diag(p) - p pᵀ`` (the exact Hessian of the cross-entropy), applied as an element-wise
product and a row sum. The gradient with respect to dense labels is TensorFlow's ``-log_softmax(z)``, and, as in
TensorFlow, the second-order terms through the labels are not formed.

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


def _logits_gradient(op: Any, grad_loss: tf.Tensor, grad_backprop: Optional[tf.Tensor]) -> tf.Tensor:
    """Gradient with respect to the logits (B, C), differentiable again through ``softmax`` only."""
    logits = op.inputs[0]
    probabilities = tf.nn.softmax(logits)
    backprop = probabilities + tf.stop_gradient(op.outputs[1] - probabilities)  # value: the op's softmax(z) - y
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
