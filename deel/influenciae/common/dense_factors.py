"""Per-sample gradients of dense layers in factored form: their products without the (B, P) gradients.

A watched weight matrix W used as ``z = a W`` on a batch of rows, one row per sample, has the per-sample gradient
``a_iᵀ δ_i`` (an outer product) with ``δ_i = ∂ℓ_i / ∂z_i``; a bias added to z has the per-sample gradient δ_i. So for
two samples i and j,

* ``⟨g_i, g_j⟩ = Σ_W (a_i · a_j)(δ_i · δ_j) + Σ_b δ_i · δ_j``,
* ``‖g_i‖² = Σ_W ‖a_i‖² ‖δ_i‖² + Σ_b ‖δ_i‖²``,

computed from (B, in) and (B, out) factors: one forward and one backward pass per batch, and Gram products of
``B_t × B × (in + out)`` operations instead of writing and multiplying (B, P) gradients (memory-bound: on the
digits MLP, P = 2,410, writing the 479 per-sample gradients of a batch takes as long as the closed form).

The factors are found in the traced graph of the loss: every watched weight must reach exactly one ``MatMul`` as
its right operand (no transposition, left operand of rank 2) or one ``BiasAdd`` / ``AddV2`` with a rank-2 tensor
(Keras ``Dense`` on (B, features) inputs). The left operand must have one row per sample, which is checked when
the kernel runs. Anything else (convolutions, ``Dense`` on sequences, shared weights) is reported as unsupported
and callers use materialised per-sample gradients.
"""
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from .autodiff import LossKernels

# Ops a weight may pass through unchanged before it is used.
_PASS_THROUGH = ("Identity",)
_BIAS_OPS = ("BiasAdd", "AddV2", "Add")
# Message of the runtime check that a dense layer's left operand has one row per sample.
_ROW_CHECK_MESSAGE = "the rows of a dense layer are not one per sample"


class UnsupportedStructure(Exception):
    """The watched weights are not all dense kernels and biases used once on per-sample rows."""


def _single_use(tensor: tf.Tensor) -> Optional[Tuple[Any, tf.Tensor]]:
    """The one op consuming ``tensor`` (through pass-through ops) and the tensor it consumes, or None."""
    while True:
        consumers = tensor.consumers()
        if len(consumers) != 1:
            return None
        if consumers[0].type not in _PASS_THROUGH:
            return consumers[0], tensor
        tensor = consumers[0].outputs[0]


def _output_to_differentiate(value: tf.Tensor) -> Tuple[str, Any]:
    """(``"kernel"``, the MatMul op) or (``"bias"``, the addition op) using a watched weight's value."""
    use = _single_use(value)
    if use is None:
        raise UnsupportedStructure("a watched weight is used more than once (or not at all)")
    op, used = use
    if op.type == "MatMul" and op.inputs[1] is used and not op.get_attr("transpose_a") \
            and not op.get_attr("transpose_b") and op.inputs[0].shape.rank == 2:
        return "kernel", op
    if op.type in _BIAS_OPS and used.shape.rank == 1 and op.outputs[0].shape.rank == 2:
        return "bias", op
    raise UnsupportedStructure(f"a watched weight is used by a {op.type} op")


class DenseFactors:
    """Factored per-sample gradients ``[(rows (B, in), deltas (B, out)) per watched weight]`` of one set of loss
    kernels (biases get rows of ones). Calling it returns None once the structure is found unsupported."""

    def __init__(self, kernels: LossKernels):
        self.kernels = kernels
        self.supported = True
        self._function = tf.function(self._factors_eager, autograph=False, reduce_retracing=True)

    def __call__(self, batch: Tuple) -> Optional[List[Tuple[tf.Tensor, tf.Tensor]]]:
        return guarded_call(self, self._function, tuple(batch))

    def factors_in_graph(self, batch: Tuple) -> List[Tuple[tf.Tensor, tf.Tensor]]:
        """The factors of a batch, built in the graph being traced (raises :class:`UnsupportedStructure`)."""
        return self._factors_eager(batch)

    def _factors_eager(self, batch: Tuple) -> List[Tuple[tf.Tensor, tf.Tensor]]:
        kernels = self.kernels
        if tf.executing_eagerly():
            raise UnsupportedStructure("the graph can only be inspected while tracing")
        inputs, targets, sample_weight = kernels.process_batch(batch)
        values = kernels.unflatten(kernels.flat_weights())
        losses = kernels.losses_of(values, inputs, targets, sample_weight)
        uses = [_output_to_differentiate(value) for value in values]
        deltas = tf.gradients(tf.reduce_sum(losses), [op.outputs[0] for _, op in uses],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        count = tf.shape(losses)[0]
        factors = []
        for (kind, op), delta in zip(uses, deltas):
            rows = op.inputs[0] if kind == "kernel" else tf.ones(tf.stack([count, 1]), delta.dtype)
            check = tf.debugging.assert_equal(tf.shape(rows)[0], count, message=_ROW_CHECK_MESSAGE)
            with tf.control_dependencies([check]):
                factors.append((tf.cast(tf.identity(rows), delta.dtype), delta))
        return factors


def guarded_call(owner: Any, function: Any, *args: Any) -> Any:
    """``function(*args)``, or None (and ``owner.supported = False`` from then on) when the structure is not
    supported: found while tracing, or by the per-sample row check when running. Other runtime errors (a label out
    of range, say) are the data's, not the structure's: they propagate and leave ``owner.supported`` unchanged."""
    if not owner.supported:
        return None
    try:
        return function(*args)
    except (UnsupportedStructure, LookupError, tf.errors.InvalidArgumentError) as error:
        if isinstance(error, tf.errors.InvalidArgumentError) and _ROW_CHECK_MESSAGE not in str(error):
            raise
        owner.supported = False
        return None


def dense_factors_of(kernels: LossKernels) -> DenseFactors:
    """The :class:`DenseFactors` of a set of kernels, created once and kept with them."""
    cache = kernels.compiled_cache
    if "dense_factors" not in cache:
        cache["dense_factors"] = DenseFactors(kernels)
    return cache["dense_factors"]


def factored_gram(left: List[List[Tuple[tf.Tensor, tf.Tensor]]], right: List[List[Tuple[tf.Tensor, tf.Tensor]]],
                  scales: tf.Tensor) -> tf.Tensor:
    """``Σ_k scales[k] ⟨g_k(i), g_k(j)⟩`` for factored gradients of K checkpoints: (B_left, B_right)."""
    blocks = []
    for index, (left_factors, right_factors) in enumerate(zip(left, right)):
        gram = tf.add_n([tf.matmul(left_rows, right_rows, transpose_b=True)
                         * tf.matmul(left_deltas, right_deltas, transpose_b=True)
                         for (left_rows, left_deltas), (right_rows, right_deltas) in zip(left_factors, right_factors)])
        blocks.append(tf.cast(scales[index], gram.dtype) * gram)
    return tf.add_n(blocks)


def factored_squared_norms(factors: List[List[Tuple[tf.Tensor, tf.Tensor]]], scales: tf.Tensor) -> tf.Tensor:
    """``Σ_k scales[k] ‖g_k(i)‖²`` for factored gradients of K checkpoints: (B,)."""
    norms = []
    for index, checkpoint_factors in enumerate(factors):
        squared = tf.add_n([tf.reduce_sum(tf.square(rows), 1) * tf.reduce_sum(tf.square(deltas), 1)
                            for rows, deltas in checkpoint_factors])
        norms.append(tf.cast(scales[index], squared.dtype) * squared)
    return tf.add_n(norms)
