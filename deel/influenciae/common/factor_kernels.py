"""Compiled per-layer factors of an influence model's watched weights, and their products.

For a batch, one forward pass runs with the planned layers' ``call`` replaced (see :mod:`.factor_plan`): each
factored layer's adapter records its input and adds a zero probe to its pre-activation output, each local layer
adds one to its output. One backward pass of the summed loss gives every probe's gradient, ``∂ℓ_i/∂z_i`` for all
samples at once. Then

* factored layers give :class:`~.layer_factors.LayerFactors` (:mod:`.layer_adapters`);
* local layers give the per-sample gradients of their own weights as vector-Jacobian products of the layer alone,
  vectorized over the batch;
* the remaining watched weights get per-sample gradients of the whole model, vectorized over the batch, for those
  weights only.

Everything runs in one compiled function per product (pairwise, squared norms, materialised gradients); the
functions are attributes of :class:`LayerFactorKernels`, which :attr:`BaseInfluenceModel.layer_factors` owns.
"""
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from .autodiff import LossKernels, traced_with_overrides
from .factor_plan import CallRecord, FactorPlan, LayerPlan, batch_specs, build_plan, replaced_calls
from .layer_adapters import RowMoments
from .layer_factors import BatchFactors, LayerFactors
from .memory import bytes_per_sample
from .pfor_converters import vectorized_per_sample

LayerTensors = Tuple[Optional[tf.Tensor], Optional[tf.Tensor], Tuple[tf.Tensor, ...]]


class RowShortcuts(NamedTuple):
    """Ways to use a layer's rows without forming them (see :class:`.LayerFactors`), None when it has none."""

    moments: Optional[RowMoments] = None
    windows: Optional[Callable[[], List[tf.Tensor]]] = None


def _compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``tf.function`` without AutoGraph, kept out of it even when called from converted code (``tf.data`` maps),
    whose conversion status a ``tf.function(autograph=False)`` would inherit otherwise; traced with the library's
    gradient overrides (:mod:`.gradient_overrides`), like the loss kernels."""
    return tf.function(tf.autograph.experimental.do_not_convert(traced_with_overrides(function)), autograph=False,
                       reduce_retracing=True)


class _BatchCompiled:
    """:func:`_compiled` ``function`` whose first call traces it for arguments of any first dimension (see
    :func:`compiled_for_batches`)."""

    def __init__(self, function: Callable[..., Any]):
        self._function = _compiled(function)
        self._primed = False

    def __call__(self, *args: Any) -> Any:
        if not self._primed:
            self._function.get_concrete_function(*batch_specs(args, None))
            self._primed = True
        return self._function(*args)

    def output_bytes_per_sample(self, *args: Any) -> Optional[int]:
        """Bytes per sample of the outputs of a call on ``args`` (traced for them, not run), every output having
        the samples on its first axis; None when a non-batch dimension is unknown."""
        concrete = self._function.get_concrete_function(*batch_specs(args, None))
        self._primed = True
        return bytes_per_sample(concrete.structured_outputs)

    def experimental_get_tracing_count(self) -> int:
        """Number of traces so far (as ``tf.function``'s)."""
        return self._function.experimental_get_tracing_count()


def compiled_for_batches(function: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_compiled` ``function``, traced at its first call for arguments shaped like that call's with any first
    dimension: every batch of a pass, the last smaller one included, then runs the same graph (one trace per pass
    instead of two; a call with another structure or dtype still traces anew)."""
    return _BatchCompiled(function)


def _watched_kernel(plan: LayerPlan) -> Optional[Any]:
    """The layer's kernel when it is watched, else None."""
    kernel = plan.adapter.kernel(plan.layer)
    return kernel if kernel is not None and any(weight is kernel for weight in plan.weights) else None


def _layer_tensors(plan: LayerPlan, calls: Sequence[CallRecord], gradients: Sequence[tf.Tensor],
                   dtype: tf.DType) -> Tuple[LayerTensors, "RowShortcuts"]:
    """(rows, output gradients, closed forms of the watched non-kernel weights) of a factored layer; the calls of
    a layer called several times are more positions of each sample."""
    adapter, layer = plan.adapter, plan.layer
    parts = [adapter.factors(layer, call.inputs, gradient) for call, gradient in zip(calls, gradients)]
    rows = deltas = None
    if all(part.inputs is not None for part in parts):
        rows = tf.concat([part.inputs for part in parts], axis=1) if len(parts) > 1 else parts[0].inputs
        rows = rows if adapter.vocabulary(layer) is not None else tf.cast(rows, dtype)
    if all(part.output_gradients is not None for part in parts):
        deltas = tf.cast(tf.concat([part.output_gradients for part in parts], axis=1), dtype)
    kernel = _watched_kernel(plan)
    if kernel is not None and (rows is None or deltas is None):
        raise ValueError(f"{type(adapter).__name__}.factors gave no rows or output gradients for the kernel of "
                         f"{layer.name!r}.")
    every = adapter.weights(layer)
    closed = []
    for weight in plan.weights:
        if weight is not kernel:
            index = next(number for number, candidate in enumerate(every) if candidate is weight)
            closed.append(tf.cast(tf.add_n([part.closed_forms[index] for part in parts]), dtype))
    shortcuts = RowShortcuts()
    if kernel is not None and all(part.row_moments is not None for part in parts):
        def moments(moments_dtype: tf.DType) -> Tuple[tf.Tensor, tf.Tensor]:
            products, sums = zip(*(part.row_moments(moments_dtype) for part in parts))
            return tf.add_n(products), tf.add_n(sums)
        shortcuts = shortcuts._replace(moments=moments)
    if kernel is not None and len(parts) == 1 and parts[0].row_windows is not None:
        shortcuts = shortcuts._replace(windows=lambda: [tf.cast(window, dtype) for window in parts[0].row_windows()])
    return (rows, deltas, tuple(closed)), shortcuts


def _local_gradients(plan: LayerPlan, calls: Sequence[CallRecord], gradients: Sequence[tf.Tensor],
                     dtype: tf.DType) -> List[tf.Tensor]:
    """Per-sample gradients (B, size) of a local layer's watched weights: ``J_w(x_i)ᵀ δ_i`` for the layer alone,
    summed over its calls."""
    layer, weights = plan.layer, list(plan.weights)
    values = [tf.convert_to_tensor(weight.value) for weight in weights]
    total = None
    for call, output_gradients in zip(calls, gradients):
        def one_sample(sample: Tuple[tf.Tensor, tf.Tensor], kwargs: dict = call.kwargs) -> tf.Tensor:
            inputs, output_gradient = sample
            with tf.GradientTape() as tape:
                tape.watch(values)
                with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                    outputs = layer(inputs[None], **kwargs)
            parts = tape.gradient(outputs, values, output_gradients=output_gradient[None],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(part, [-1]) for part in parts], axis=0)

        gradient = vectorized_per_sample(one_sample, (call.inputs, output_gradients))
        total = gradient if total is None else total + gradient
    sizes = [int(np.prod([int(size) for size in weight.shape])) for weight in weights]
    return [tf.cast(part, dtype) for part in tf.split(total, sizes, axis=1)]


class LayerFactorKernels:
    """The per-layer factors of a model's watched weights, per batch, and their products, compiled once.

    The plan (:class:`~.factor_plan.FactorPlan`: which layers are factored) is built from the first batch.

    Parameters
    ----------
    kernels
        The loss kernels of an influence model (model, watched weights, loss).

    Attributes
    ----------
    plan : FactorPlan or None
        The plan, once a batch was seen.
    weighted_products : dict
        Compiled products summed over several models' factors (:class:`WeightedProducts`), by the ids of those
        models' factor kernels; kept on the first one so that new callers on the same models trace nothing.
    """

    def __init__(self, kernels: LossKernels):
        self._traced_shortcuts: List[RowShortcuts] = []
        # Compiled functions of the methods built on these factors, shared by their instances (keyed by the method).
        self.shared_functions: Dict[Tuple, Callable[..., Any]] = {}
        self.kernels = kernels
        self.plan: Optional[FactorPlan] = None
        # Traced once for any batch size (a dataset's last, smaller batch does not trace them again).
        self._flat_factors: _BatchCompiled = _BatchCompiled(self._flat_tensors)
        self._pairwise: Callable[[Tuple, Tuple], tf.Tensor] = compiled_for_batches(
            lambda left, right: self.in_graph(left).pairwise(self.in_graph(right)))
        self._squared_norms: Callable[[Tuple], tf.Tensor] = compiled_for_batches(
            lambda batch: self.in_graph(batch).squared_norms())
        self._gradients: Callable[[Tuple], tf.Tensor] = compiled_for_batches(
            lambda batch: self.in_graph(batch).gradients())
        self.weighted_products: Dict[Tuple[int, ...], "WeightedProducts"] = {}

    def plan_for(self, batch: Tuple) -> FactorPlan:
        """The plan, built from ``batch``'s structure the first time."""
        if self.plan is None:
            self.plan = build_plan(self.kernels, tuple(batch))
        return self.plan

    def __call__(self, batch: Tuple) -> BatchFactors:
        """The factors of one batch (compiled)."""
        batch = tuple(batch)
        plan = self.plan_for(batch)
        layers, materialised = self._flat_factors(batch)
        return self._assemble(plan, layers, materialised)

    def in_graph(self, batch: Tuple) -> BatchFactors:
        """The factors of one batch, built in the graph being traced (for compiled functions of one's own)."""
        batch = tuple(batch)
        plan = self.plan_for(batch)
        layers, materialised = self._flat_tensors(batch)
        return self._assemble(plan, layers, materialised, self._traced_shortcuts)

    def tensors(self, batch: Tuple) -> Tuple[Tuple[LayerTensors, ...], Tuple[tf.Tensor, ...]]:
        """The factors of one batch as tensors (compiled), to be held and turned back into factors by
        :meth:`assemble` (in a graph being traced) without running the batch's passes again."""
        batch = tuple(batch)
        self.plan_for(batch)
        return self._flat_factors(batch)

    def tensors_bytes_per_sample(self, batch: Tuple) -> Optional[int]:
        """Bytes per sample of :meth:`tensors` for batches shaped like ``batch``, known without running them (None
        when a size depends on the values)."""
        batch = tuple(batch)
        self.plan_for(batch)
        return self._flat_factors.output_bytes_per_sample(batch)

    def assemble(self, tensors: Tuple[Tuple[LayerTensors, ...], Tuple[tf.Tensor, ...]]) -> BatchFactors:
        """:class:`BatchFactors` from :meth:`tensors` (the plan must be built)."""
        return self._assemble(self.plan, *tensors)

    def pairwise(self, left: Tuple, right: Tuple) -> tf.Tensor:
        """``⟨g_i, g_j⟩`` for every sample i of ``left`` and j of ``right``: (B_left, B_right)."""
        self.plan_for(left)
        return self._pairwise(tuple(left), tuple(right))

    def squared_norms(self, batch: Tuple) -> tf.Tensor:
        """``‖g_i‖²``: (B,)."""
        self.plan_for(batch)
        return self._squared_norms(tuple(batch))

    def gradients(self, batch: Tuple) -> tf.Tensor:
        """The per-sample gradients in the layout of ``InfluenceModel.batch_jacobian_tensor``: (B, P)."""
        self.plan_for(batch)
        return self._gradients(tuple(batch))

    # Building ----------------------------------------------------------------------------------------------------
    def _assemble(self, plan: FactorPlan, layers: Sequence[LayerTensors], materialised: Sequence[tf.Tensor],
                  shortcuts: Sequence[RowShortcuts] = ()) -> BatchFactors:
        factors = []
        shortcuts = list(shortcuts) or [RowShortcuts()] * len(layers)
        for layer_plan, (rows, deltas, closed), shortcut in zip(plan.factored, layers, shortcuts):
            adapter, layer = layer_plan.adapter, layer_plan.layer
            kernel = _watched_kernel(layer_plan)
            others = [weight for weight in layer_plan.weights if weight is not kernel]
            factors.append(LayerFactors(layer, rows, deltas, kernel=kernel, closed_forms=list(zip(others, closed)),
                                        vocabulary=adapter.vocabulary(layer),
                                        kernel_layout=functools.partial(adapter.kernel_layout, layer),
                                        row_moments=shortcut.moments, row_windows=shortcut.windows))
        weights = [weight for layer_plan in plan.local for weight in layer_plan.weights]
        weights += [self.kernels.watched[position] for position in plan.materialised]
        return BatchFactors(self.kernels.watched, factors, list(zip(weights, materialised)))

    def _flat_tensors(self, batch: Tuple) -> Tuple[Tuple[LayerTensors, ...], Tuple[tf.Tensor, ...]]:
        """The factors as tensors: per factored layer ``(rows, output gradients, closed forms)``, then the
        materialised gradients (B, size) of the local layers' weights and of the others."""
        plan, kernels = self.plan_for(batch), self.kernels
        layers: List[LayerTensors] = []
        materialised: List[tf.Tensor] = []
        # Functions of this trace's tensors, read by in_graph right after (they cannot be outputs of a tf.function).
        self._traced_shortcuts = shortcuts = []
        if plan.patched:
            inputs, targets, sample_weight = kernels.process_batch(batch)
            values = kernels.unflatten(kernels.flat_weights())
            with tf.GradientTape() as tape:
                with replaced_calls(plan.patched, tape.watch) as records:
                    losses = kernels.losses_of(values, inputs, targets, sample_weight)
                total = tf.reduce_sum(losses)
            probes = [call.probe for calls in records for call in calls]
            flat = iter(tape.gradient(total, probes, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            for layer_plan, calls in zip(plan.patched, records):
                gradients = [next(flat) for _ in calls]
                if layer_plan.adapter is not None:
                    tensors, layer_shortcuts = _layer_tensors(layer_plan, calls, gradients, kernels.dtype)
                    layers.append(tensors)
                    shortcuts.append(layer_shortcuts)
                else:
                    materialised.extend(_local_gradients(layer_plan, calls, gradients, kernels.dtype))
        if plan.materialised:
            materialised.extend(self._whole_model_gradients(batch, plan.materialised))
        return tuple(layers), tuple(materialised)

    def _whole_model_gradients(self, batch: Tuple, positions: Sequence[int]) -> List[tf.Tensor]:
        """Per-sample gradients (B, size) of the watched weights at ``positions`` through the whole model,
        vectorized over the batch; the other weights are held at their values."""
        kernels = self.kernels
        inputs, targets, sample_weight = kernels.process_batch(batch)
        values = kernels.unflatten(kernels.flat_weights())
        sizes = [kernels.sizes[position] for position in positions]
        theta = tf.concat([tf.reshape(values[position], [-1]) for position in positions], axis=0)

        def one_sample(sample: Tuple) -> tf.Tensor:
            sample = tf.nest.map_structure(lambda tensor: tf.expand_dims(tensor, 0), sample)
            inputs_i, targets_i, weight_i = sample if len(sample) == 3 else (*sample, None)
            with tf.GradientTape() as tape:
                tape.watch(theta)
                current = list(values)
                for position, part in zip(positions, tf.split(theta, sizes)):
                    current[position] = tf.reshape(part, kernels.shapes[position])
                loss = tf.reduce_sum(kernels.losses_of(current, inputs_i, targets_i, weight_i))
            return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        samples = (inputs, targets) if sample_weight is None else (inputs, targets, sample_weight)
        gradients = vectorized_per_sample(one_sample, samples)
        return [tf.cast(part, kernels.dtype) for part in tf.split(gradients, sizes, axis=1)]


class WeightedProducts:
    """Products summed over several models' per-layer factors with one weight per model (e.g. TracIn's
    checkpoints and learning rates), each product one compiled function over every model:

    * ``pairwise(left, right, weights)``: ``Σ_k w_k ⟨g_k(i), g_k(j)⟩``, (B_left, B_right);
    * ``squared_norms(batch, weights)``: ``Σ_k w_k ‖g_k(i)‖²``, (B,);
    * ``gradients(batch, weights)``: ``[w_1 g_1(i), ..., w_K g_K(i)]``, (B, Σ_k P_k);
    * ``pairwise_with(held, right, weights)``: ``pairwise(batch, right, weights)`` from every model's
      :meth:`LayerFactorKernels.tensors` of ``batch``, held (its passes are not run again for every ``right``).

    The models' plans must be built (``plan_for``) before a first call. Obtain it with :func:`weighted_products`.
    """

    def __init__(self, factors: Sequence[LayerFactorKernels]):
        self.factors = list(factors)
        dtype = self.factors[0].kernels.dtype

        def summed(products: Callable[[LayerFactorKernels], tf.Tensor], weights: tf.Tensor) -> tf.Tensor:
            return tf.add_n([tf.cast(weights[index], dtype) * products(factor)
                             for index, factor in enumerate(self.factors)])

        self.pairwise = _compiled(lambda left, right, weights: summed(
            lambda factor: factor.in_graph(left).pairwise(factor.in_graph(right)), weights))
        self.squared_norms = _compiled(lambda batch, weights: summed(
            lambda factor: factor.in_graph(batch).squared_norms(), weights))
        self.gradients = _compiled(lambda batch, weights: tf.concat(
            [tf.cast(weights[index], dtype) * factor.in_graph(batch).gradients()
             for index, factor in enumerate(self.factors)], axis=1))
        self.pairwise_with = _compiled(lambda held, right, weights: tf.add_n(
            [tf.cast(weights[index], dtype) * factor.assemble(held[index]).pairwise(factor.in_graph(right))
             for index, factor in enumerate(self.factors)]))


def weighted_products(factors: Sequence[LayerFactorKernels]) -> WeightedProducts:
    """The compiled weighted products of these models' factors, built once per tuple of models."""
    key = tuple(id(factor) for factor in factors)
    cache = factors[0].weighted_products
    if key not in cache:
        cache[key] = WeightedProducts(factors)
    return cache[key]
