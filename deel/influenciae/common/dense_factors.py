"""Per-sample gradients of linear layers in factored form: their products without the (B, P) gradients.

A watched weight matrix W used as ``z_{i,p} = a_{i,p} W`` at T positions p of sample i (one row per sample for
``Dense`` on features, one per time step for ``Dense``/``EinsumDense`` on sequences, one image patch per output
position for ``Conv2D``, a one-hot token for ``Embedding``) has the per-sample gradient
``g_i = Σ_p a_{i,p} δ_{i,p}ᵀ`` with ``δ_{i,p} = ∂ℓ_i / ∂z_{i,p}``. For two samples i and j,

* ``⟨g_i, g_j⟩ = Σ_{p,q} (a_{i,p} · a_{j,q})(δ_{i,p} · δ_{j,q})`` (the Gram form, cost ∝ T² (in + out) per pair),
* or ``g_i`` is formed by one batched product (cost ∝ T · in · out per sample) and the products are taken of
  the (B, in · out) gradients; each layer uses the cheaper of the two (T = 1, a dense layer on features: always
  the Gram form, ``(a_i · a_j)(δ_i · δ_j)``).

A weight w that reaches the per-sample computation through element-wise broadcasting (a bias, BatchNorm's or
LayerNorm's γ and β, a learned position embedding) has the per-sample gradient ``Σ_u (Σ_broadcast δ_u ∘ ∂u) J_u``
where u are the tensors computed from the weights alone that enter an op of the samples (``J_u = ∂u/∂w``, a small
Jacobian formed once per batch; the identity when u is w reshaped). Watched weights used any other way (a
depthwise convolution, a weight normalised by its own norm and then multiplied) get materialised per-sample
gradients (``tf.vectorized_map``) in the same compiled function, for those weights only.

The structure is read from the traced graph of the loss: the ops that depend on the samples are marked, then each
watched weight is followed through the ops that do not until it meets one that does. Every factor must have one
leading row per sample, which is checked when the kernel runs; a failed check reports the structure unsupported
and callers use materialised per-sample gradients of every weight.
"""
import warnings
from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import tensorflow as tf

from .autodiff import LossKernels
from .pfor_converters import per_sample_converters

# Ops that only change how a weight's values are laid out (row-major order kept): its inner products are unchanged.
_LAYOUT_OPS = ("Identity", "Reshape", "Squeeze", "ExpandDims")
_KERNEL_OPS = ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "Conv2D", "GatherV2")
_BROADCAST_OPS = ("BiasAdd", "AddV2", "Add", "Sub", "Mul")
# Message of the runtime check that a factor has one leading row per sample.
_ROW_CHECK_MESSAGE = "the rows of a dense layer are not one per sample"


class UnsupportedStructure(Exception):
    """The watched weights cannot be put in factored form (or none of them can)."""


class OuterFactor:
    """Per-sample gradient ``g_i = Σ_p a_{i,p} δ_{i,p}ᵀ`` of one weight matrix, laid out like the weight.

    Parameters
    ----------
    rows
        Layer inputs ``a`` (B, T, in), or integer token ids (B, T) when ``depth`` is given (one-hot rows).
    deltas
        Output gradients ``δ`` (B, T, out).
    depth
        Vocabulary size of an embedding (``in``), or None for dense rows.
    """

    def __init__(self, rows: tf.Tensor, deltas: tf.Tensor, depth: Optional[int] = None):
        self.rows = rows
        self.deltas = deltas
        self.depth = depth

    @property
    def positions(self) -> Optional[int]:
        """T, when known statically."""
        return self.deltas.shape[1]

    @property
    def in_size(self) -> int:
        """Rows' width (the vocabulary size for tokens)."""
        return int(self.depth if self.depth is not None else self.rows.shape[-1])

    @property
    def out_size(self) -> int:
        """Output gradients' width."""
        return int(self.deltas.shape[-1])

    def prefers_gram(self, pairwise: bool) -> bool:
        """Whether the Gram form costs less than forming ``g_i``: ``T² (in + out)`` against ``in · out`` per pair,
        ``T² (in + out)`` against ``T · in · out + in · out`` per sample for squared norms."""
        positions = self.positions
        if positions == 1:
            return True
        if positions is None:
            return False
        row_cost = 1 if self.depth is not None else self.in_size
        gram = positions * positions * (row_cost + self.out_size)
        size = self.in_size * self.out_size
        return gram <= size if pairwise else gram <= positions * row_cost * self.out_size + size

    def materialise(self) -> tf.Tensor:
        """``g_i`` flattened like the (in, out) weight: (B, in · out)."""
        count = tf.shape(self.deltas)[0]
        if self.depth is not None:
            ids = tf.cast(self.rows, tf.int64) + tf.range(tf.cast(count, tf.int64))[:, None] * self.depth
            sums = tf.math.unsorted_segment_sum(tf.reshape(self.deltas, [-1, self.out_size]), tf.reshape(ids, [-1]),
                                                tf.cast(count, tf.int64) * self.depth)
            return tf.reshape(sums, tf.stack([count, self.depth * self.out_size]))
        gradients = tf.matmul(self.rows, self.deltas, transpose_a=True)  # (B, in, out)
        return tf.reshape(gradients, tf.stack([count, self.in_size * self.out_size]))

    def row_gram(self, other: "OuterFactor") -> tf.Tensor:
        """``a_{i,p} · a_{j,q}``: (B_self, B_other, T, T')."""
        if self.depth is not None:
            return tf.cast(tf.equal(self.rows[:, None, :, None], other.rows[None, :, None, :]), self.deltas.dtype)
        return tf.einsum("ipk,jqk->ijpq", self.rows, other.rows)

    def self_row_gram(self) -> tf.Tensor:
        """``a_{i,p} · a_{i,q}``: (B, T, T)."""
        if self.depth is not None:
            return tf.cast(tf.equal(self.rows[:, :, None], self.rows[:, None, :]), self.deltas.dtype)
        return tf.matmul(self.rows, self.rows, transpose_b=True)


Factor = Union[OuterFactor, tf.Tensor]  # a factored gradient, or a materialised one (B, n)


def pair_products(left: Factor, right: Factor) -> tf.Tensor:
    """``⟨g_i, g_j⟩`` of one weight for every pair of a left and a right batch: (B_left, B_right)."""
    if not isinstance(left, OuterFactor):
        return tf.matmul(left, right, transpose_b=True)
    if left.positions == 1 and left.depth is None:
        return tf.matmul(left.rows[:, 0], right.rows[:, 0], transpose_b=True) \
            * tf.matmul(left.deltas[:, 0], right.deltas[:, 0], transpose_b=True)
    if left.prefers_gram(pairwise=True):
        deltas = tf.einsum("ipk,jqk->ijpq", left.deltas, right.deltas)
        return tf.reduce_sum(left.row_gram(right) * deltas, axis=[2, 3])
    return tf.matmul(left.materialise(), right.materialise(), transpose_b=True)


def squared_norm(factor: Factor) -> tf.Tensor:
    """``‖g_i‖²`` of one weight: (B,)."""
    if not isinstance(factor, OuterFactor):
        return tf.reduce_sum(tf.square(factor), axis=1)
    if factor.positions == 1 and factor.depth is None:
        return tf.reduce_sum(tf.square(factor.rows[:, 0]), 1) * tf.reduce_sum(tf.square(factor.deltas[:, 0]), 1)
    if factor.prefers_gram(pairwise=False):
        deltas = tf.matmul(factor.deltas, factor.deltas, transpose_b=True)
        return tf.reduce_sum(factor.self_row_gram() * deltas, axis=[1, 2])
    return tf.reduce_sum(tf.square(factor.materialise()), axis=1)


def as_gradient(factor: Factor) -> tf.Tensor:
    """The materialised per-sample gradient of one weight, in the weight's row-major layout: (B, size)."""
    return factor.materialise() if isinstance(factor, OuterFactor) else factor


# -------------------------------------------------------------------------------------------------------------------
# Reading the structure from the graph
# -------------------------------------------------------------------------------------------------------------------
def _sample_dependent_ops(sources: Sequence[tf.Tensor]) -> Set[str]:
    """Names of the ops whose value depends on the samples (forward closure of ``sources``)."""
    seen: Set[str] = set()
    stack = list(sources)
    while stack:
        for consumer in stack.pop().consumers():
            if consumer.name not in seen:
                seen.add(consumer.name)
                stack.extend(consumer.outputs)
    return seen


def _frontier(value: tf.Tensor, sample_ops: Set[str]) -> Tuple[List[Tuple[tf.Tensor, Any, int]], bool]:
    """Where a weight meets the samples: the (tensor from the weights alone, sample op, input index) edges, and
    whether the weight reaches them through layout ops only."""
    edges, layout_only, seen, stack = [], True, {value.name}, [value]
    while stack:
        tensor = stack.pop()
        for consumer in set(tensor.consumers()):
            if consumer.name in sample_ops:
                edges.extend((tensor, consumer, index) for index, used in enumerate(consumer.inputs)
                             if used.name == tensor.name)
                continue
            layout_only = layout_only and consumer.type in _LAYOUT_OPS
            for output in consumer.outputs:
                if output.name not in seen:
                    seen.add(output.name)
                    stack.append(output)
    return edges, layout_only


def _attr(op: Any, name: str) -> Any:
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _static_shape(tensor: tf.Tensor) -> Optional[Tuple[int, ...]]:
    return tuple(tensor.shape.as_list()) if tensor.shape.is_fully_defined() else None


class _Plan:
    """How one watched weight's per-sample gradient is assembled: the tensors whose output gradients it needs, the
    leading-dimension checks, and a builder from those gradients."""

    def __init__(self, outputs: List[tf.Tensor], checked: List[tf.Tensor], build: Any):
        self.outputs, self.checked, self.build = outputs, checked, build


def _kernel_plan(op: Any, index: int) -> Optional[Tuple[tf.Tensor, tf.Tensor, Any]]:  # pylint: disable=R0911
    """(output to differentiate, tensor whose leading dimension is the batch, builder(δ, B) -> OuterFactor) for a
    weight matrix entering ``op`` as its input ``index`` (the weight reshaped, row-major order kept), or None."""
    shape = _static_shape(op.inputs[index])
    if shape is None:
        return None
    output = op.outputs[0]
    if op.type == "MatMul" and index == 1 and not _attr(op, "transpose_a") and not _attr(op, "transpose_b"):
        left = op.inputs[0]
        source = left.op.inputs[0] if left.op.type == "Reshape" else None
        if source is not None and (source.shape.rank or 0) >= 3 and source.shape[-1] == shape[0]:
            # Dense on sequences: (B, ..., in) folded into rows, row-major, so the rows of a sample are contiguous.
            return output, source, lambda delta, count: OuterFactor(
                tf.reshape(left, tf.stack([count, -1, shape[0]])), tf.reshape(delta, tf.stack([count, -1, shape[1]])))
        return output, left, lambda delta, count: OuterFactor(left[:, None, :], delta[:, None, :])
    adjoint = op.type in ("BatchMatMulV2", "BatchMatMulV3") and (_attr(op, "adj_x") or _attr(op, "adj_y"))
    if op.type in ("BatchMatMulV2", "BatchMatMulV3") and index == 1 and len(shape) == 2 and not adjoint \
            and (op.inputs[0].shape.rank or 0) >= 3:
        left = op.inputs[0]
        return output, left, lambda delta, count: OuterFactor(
            tf.reshape(left, tf.stack([count, -1, shape[0]])), tf.reshape(delta, tf.stack([count, -1, shape[1]])))
    if op.type == "GatherV2" and index == 0 and len(shape) == 2 and _attr(op, "batch_dims") == 0 \
            and tf.get_static_value(op.inputs[2]) == 0:
        indices = op.inputs[1]
        return output, indices, lambda delta, count: OuterFactor(
            tf.reshape(indices, tf.stack([count, -1])), tf.reshape(delta, tf.stack([count, -1, shape[1]])),
            depth=shape[0])
    if op.type == "Conv2D" and index == 1 and _attr(op, "data_format") == "NHWC":
        return _conv_plan(shape, op)
    return None


def _conv_plan(shape: Tuple[int, ...], op: Any) -> Optional[Tuple[tf.Tensor, tf.Tensor, Any]]:  # pylint: disable=R0914
    """The plan of a 2-D convolution: image patches (im2col) as rows, one per output position."""
    height, width, channels, filters = shape
    images, output = op.inputs[0], op.outputs[0]
    strides, rates = list(_attr(op, "strides")), list(_attr(op, "dilations"))
    padding = _attr(op, "padding")
    consumers = output.consumers()
    if images.op.type == "SpaceToBatchND" and len(consumers) == 1 and consumers[0].type == "BatchToSpaceND":
        # A dilated convolution written as space-to-batch, convolution, batch-to-space.
        block = tf.get_static_value(images.op.inputs[1])
        images, output = images.op.inputs[0], consumers[0].outputs[0]
        known = images.shape[1:3].is_fully_defined() and output.shape[1:3].is_fully_defined()
        if block is None or strides != [1, 1, 1, 1] or not known:
            return None
        rates = [1, int(block[0]), int(block[1]), 1]
        padding = "SAME" if output.shape[1:3] == images.shape[1:3] else "VALID"
    elif padding == "EXPLICIT":
        pads = list(_attr(op, "explicit_paddings"))
        images = tf.pad(images, np.reshape(pads, [4, 2]))
        padding = "VALID"
    elif padding not in ("SAME", "VALID"):
        return None

    def build(delta, count):
        patches = tf.image.extract_patches(images, sizes=[1, height, width, 1], strides=strides, rates=rates,
                                           padding=padding)
        return OuterFactor(tf.reshape(patches, tf.stack([count, -1, height * width * channels])),
                           tf.reshape(delta, tf.stack([count, -1, filters])))

    return output, images, build


def _broadcast_gradient(tensor: tf.Tensor, op: Any, index: int) -> Optional[Any]:
    """builder(δ of the op's output, B) -> per-sample gradient (B, |tensor|) of a tensor of weights broadcast into
    an element-wise op of the samples, or None."""
    shape, rank = _static_shape(tensor), op.outputs[0].shape.rank
    if shape is None or rank is None or len(shape) > rank or (len(shape) == rank and shape[0] != 1):
        return None
    if op.type == "BiasAdd" and (index != 1 or _attr(op, "data_format") != "NHWC"):
        return None
    padded = (1,) * (rank - len(shape)) + shape
    axes = [axis for axis in range(1, rank) if padded[axis] == 1]

    def build(delta, count):
        if op.type == "Mul":
            delta = delta * op.inputs[1 - index]
        elif op.type == "Sub" and index == 1:
            delta = -delta
        if axes:
            delta = tf.reduce_sum(delta, axis=axes, keepdims=True)
        return tf.reshape(delta, tf.stack([count, -1]))  # (B, size) once the row check has passed

    return build


def _jacobian(tensor: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """``∂ tensor / ∂ weight`` of a computation on weights alone, flattened: (|tensor|, |weight|)."""
    size, weight_size = int(np.prod(tensor.shape.as_list())), int(np.prod(weight.shape.as_list()))

    def row(unit):
        gradient = tf.gradients(tensor, weight, grad_ys=tf.reshape(unit, tensor.shape),
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)[0]
        return tf.reshape(gradient, [weight_size])

    return tf.vectorized_map(row, tf.eye(size, dtype=tensor.dtype))


def _plan_weight(weight: tf.Tensor, sample_ops: Set[str]) -> Optional[_Plan]:  # pylint: disable=R0911
    """The plan of one watched weight (its value in the traced graph), or None when it needs materialised
    per-sample gradients."""
    edges, layout_only = _frontier(weight, sample_ops)
    if not edges:
        return None
    if all(op.type in _KERNEL_OPS for _, op, _ in edges):
        kernels = [_kernel_plan(op, index) for _, op, index in edges]
        if not layout_only or any(plan is None for plan in kernels):
            return None
        if len(kernels) > 1 and any(op.type == "GatherV2" for _, op, _ in edges):
            return None

        def build_outer(deltas, count):
            factors = [plan[2](delta, count) for plan, delta in zip(kernels, deltas)]
            if len(factors) == 1:
                return factors[0]
            # A weight used at several places: the uses are more positions of one sample.
            return OuterFactor(tf.concat([factor.rows for factor in factors], axis=1),
                               tf.concat([factor.deltas for factor in factors], axis=1))

        return _Plan([plan[0] for plan in kernels], [plan[1] for plan in kernels], build_outer)
    if not all(op.type in _BROADCAST_OPS for _, op, _ in edges):
        return None
    builders = [_broadcast_gradient(tensor, op, index) for tensor, op, index in edges]
    if any(builder is None for builder in builders):
        return None
    direct = layout_only and len(edges) == 1
    jacobians = None if direct else [_jacobian(tensor, weight) for tensor, _, _ in edges]

    def build_vector(deltas, count):
        parts = [builder(delta, count) for builder, delta in zip(builders, deltas)]
        if direct:
            return parts[0]
        return tf.add_n([tf.matmul(part, jacobian) for part, jacobian in zip(parts, jacobians)])

    return _Plan([op.outputs[0] for _, op, _ in edges], [op.outputs[0] for _, op, _ in edges], build_vector)


class DenseFactors:
    """Factored per-sample gradients ``[one Factor per watched weight]`` of one set of loss kernels: an
    :class:`OuterFactor` for weight matrices, a (B, size) tensor otherwise. Calling it returns None once the
    structure is found unsupported."""

    def __init__(self, kernels: LossKernels):
        self.kernels = kernels
        self.supported = True
        self._depths: List[Optional[int]] = []
        # Kept out of AutoGraph even when called from converted code (tf.data maps), whose status it would inherit.
        self._function = tf.function(tf.autograph.experimental.do_not_convert(self._flat_factors), autograph=False,
                                     reduce_retracing=True)

    def __call__(self, batch: Tuple) -> Optional[List[Factor]]:
        flat = guarded_call(self, self._function, tuple(batch))
        if flat is None:
            return None
        return [OuterFactor(part[0], part[1], depth) if isinstance(part, (tuple, list)) else part
                for part, depth in zip(flat, self._depths)]

    def _flat_factors(self, batch: Tuple) -> List[Any]:
        """The factors as tensors (``(rows, deltas)`` pairs), for a compiled function to return."""
        factors = self._factors_eager(batch)
        self._depths = [factor.depth if isinstance(factor, OuterFactor) else None for factor in factors]
        return [(factor.rows, factor.deltas) if isinstance(factor, OuterFactor) else factor for factor in factors]

    def factors_in_graph(self, batch: Tuple) -> List[Factor]:
        """The factors of a batch, built in the graph being traced (raises :class:`UnsupportedStructure`)."""
        return self._factors_eager(batch)

    def _factors_eager(self, batch: Tuple) -> List[Factor]:
        kernels = self.kernels
        if tf.executing_eagerly():
            raise UnsupportedStructure("the graph can only be inspected while tracing")
        inputs, targets, sample_weight = kernels.process_batch(batch)
        values = kernels.unflatten(kernels.flat_weights())
        losses = kernels.losses_of(values, inputs, targets, sample_weight)
        sources = [tensor for tensor in tf.nest.flatten((inputs, targets, sample_weight)) if tf.is_tensor(tensor)]
        sample_ops = _sample_dependent_ops(sources)
        plans = [_plan_weight(value, sample_ops) for value in values]
        if all(plan is None for plan in plans):
            raise UnsupportedStructure("no watched weight is a supported linear layer")
        outputs = [output for plan in plans if plan is not None for output in plan.outputs]
        deltas = tf.gradients(tf.reduce_sum(losses), outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        count = tf.shape(losses)[0]
        checks = [tf.debugging.assert_equal(tf.shape(tensor)[0], count, message=_ROW_CHECK_MESSAGE)
                  for plan in plans if plan is not None for tensor in plan.checked]
        factors: List[Optional[Factor]] = []
        with tf.control_dependencies(checks):  # nothing is reshaped per sample before the rows are checked
            for plan in plans:
                if plan is None:
                    factors.append(None)
                    continue
                plan_deltas, deltas = deltas[:len(plan.outputs)], deltas[len(plan.outputs):]
                factors.append(plan.build(plan_deltas, count))
        others = [position for position, plan in enumerate(plans) if plan is None]
        if others:
            for position, gradient in zip(others, self._materialised(batch, others)):
                factors[position] = gradient
        with tf.control_dependencies(checks):
            return [_with_dtype(factor, losses.dtype) for factor in factors]

    def _materialised(self, batch: Tuple, positions: List[int]) -> List[tf.Tensor]:
        """Per-sample gradients (B, size) of the watched weights at ``positions`` only, vectorized over the
        batch; the other weights are held at their values."""
        kernels = self.kernels
        inputs, targets, sample_weight = kernels.process_batch(batch)
        values = kernels.unflatten(kernels.flat_weights())
        sizes = [kernels.sizes[position] for position in positions]
        theta = tf.concat([tf.reshape(values[position], [-1]) for position in positions], axis=0)

        def one_sample(sample):
            sample = tf.nest.map_structure(lambda tensor: tf.expand_dims(tensor, 0), sample)
            inputs_i, targets_i, weight_i = sample if len(sample) == 3 else (*sample, None)
            with tf.GradientTape() as tape:
                tape.watch(theta)
                replaced = list(values)
                for position, part in zip(positions, tf.split(theta, sizes)):
                    replaced[position] = tf.reshape(part, kernels.shapes[position])
                loss = tf.reduce_sum(kernels.losses_of(replaced, inputs_i, targets_i, weight_i))
            return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        samples = (inputs, targets) if sample_weight is None else (inputs, targets, sample_weight)
        try:
            with per_sample_converters():
                gradients = tf.vectorized_map(one_sample, samples, fallback_to_while_loop=False)
        except (ValueError, NotImplementedError, TypeError) as error:
            warnings.warn(f"Per-sample gradients could not be fully vectorized ({type(error).__name__}: "
                          f"{str(error)[:200]}); falling back to a slower while loop for the unsupported ops.",
                          RuntimeWarning, stacklevel=2)
            gradients = tf.vectorized_map(one_sample, samples, fallback_to_while_loop=True)
        return tf.split(gradients, sizes, axis=1)


def _with_dtype(factor: Factor, dtype: tf.DType) -> Factor:
    """The factor in the losses' dtype, its tensors made to wait for the row checks."""
    if isinstance(factor, OuterFactor):
        rows = tf.identity(factor.rows) if factor.depth is not None else tf.cast(tf.identity(factor.rows), dtype)
        return OuterFactor(rows, tf.cast(tf.identity(factor.deltas), dtype), factor.depth)
    return tf.cast(tf.identity(factor), dtype)


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


def factored_gram(left: List[List[Factor]], right: List[List[Factor]], scales: tf.Tensor) -> tf.Tensor:
    """``Σ_k scales[k] ⟨g_k(i), g_k(j)⟩`` for factored gradients of K checkpoints: (B_left, B_right)."""
    blocks = []
    for index, (left_factors, right_factors) in enumerate(zip(left, right)):
        gram = tf.add_n([pair_products(left_factor, right_factor)
                         for left_factor, right_factor in zip(left_factors, right_factors)])
        blocks.append(tf.cast(scales[index], gram.dtype) * gram)
    return tf.add_n(blocks)


def factored_squared_norms(factors: List[List[Factor]], scales: tf.Tensor) -> tf.Tensor:
    """``Σ_k scales[k] ‖g_k(i)‖²`` for factored gradients of K checkpoints: (B,)."""
    norms = []
    for index, checkpoint_factors in enumerate(factors):
        squared = tf.add_n([squared_norm(factor) for factor in checkpoint_factors])
        norms.append(tf.cast(scales[index], squared.dtype) * squared)
    return tf.add_n(norms)


def factored_gradients(factors: List[List[Factor]], scales: tf.Tensor) -> tf.Tensor:
    """``[scales[0] g_1, ..., scales[K-1] g_K]`` materialised in the layout of the watched weights (the layout of
    ``InfluenceModel.batch_jacobian_tensor``): (B, Σ_k P_k)."""
    return tf.concat([tf.cast(scales[index], factor_dtype(checkpoint)) * as_gradient(factor)
                      for index, checkpoint in enumerate(factors) for factor in checkpoint], axis=1)


def factor_dtype(factors: List[Factor]) -> tf.DType:
    """The floating dtype of a checkpoint's factors."""
    first = factors[0]
    return first.deltas.dtype if isinstance(first, OuterFactor) else first.dtype
