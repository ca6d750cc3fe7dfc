"""Which watched weights get per-layer factors, and the temporary replacement of the watched layers' ``call``.

The plan is built once per model, from the structure of a first batch, before anything is compiled:

1. each watched weight is given to the layer that owns it; a layer whose :func:`~.layer_adapters.layer_adapter`
   accepts it (:meth:`~.layer_adapters.LayerAdapter.check`) is *factored*; another layer is *local*: the
   per-sample gradients of its own weights are those of the layer alone (a per-sample vector-Jacobian product of the
   layer, vectorized over the batch, with the output gradients of the whole model);
2. the loss is traced twice, with a static batch size and with an unknown one, the layers' ``call`` replaced; a
   layer is kept only if every call takes (and, when local, returns) one tensor whose first dimension is the batch
   in both traces, outside any loop or nested function, and if its weights are used inside its own calls only;
3. every other watched weight gets materialised per-sample gradients of the whole model.
"""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from .autodiff import LossKernels
from .layer_adapters import LayerAdapter, layer_adapter

# The static batch size of the plan's first trace: a dimension that follows the batch equals it there and is
# unknown in the second trace.
_PLAN_BATCH = 7


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One watched layer and the watched weights whose per-sample gradients it gives.

    Attributes
    ----------
    layer
        The Keras layer.
    adapter
        Its :class:`~.layer_adapters.LayerAdapter`, or None for a local layer (per-sample gradients of the layer
        alone, materialised).
    weights
        Its watched weights (the adapter's order, or the layer's).
    positions
        Their positions among the watched weights.
    """

    layer: keras.layers.Layer
    adapter: Optional[LayerAdapter]
    weights: Tuple[Any, ...] = dataclasses.field(repr=False)
    positions: Tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class FactorPlan:
    """How the per-sample gradients of every watched weight are obtained.

    Attributes
    ----------
    factored
        Layers with an adapter: :class:`~.layer_factors.LayerFactors`.
    local
        Layers without one: per-sample gradients of the layer alone.
    materialised
        Positions of the watched weights that get per-sample gradients of the whole model.
    refusals
        Why layers were not factored (or not local), one message per layer.
    """

    factored: Tuple[LayerPlan, ...]
    local: Tuple[LayerPlan, ...]
    materialised: Tuple[int, ...]
    refusals: Tuple[str, ...]

    @property
    def fully_factored(self) -> bool:
        """Whether no watched weight needs per-sample gradients of the whole model."""
        return not self.materialised

    @property
    def uses_layers(self) -> bool:
        """Whether some watched weight gets its per-sample gradients from its layer (factored or local)."""
        return bool(self.factored or self.local)

    @property
    def patched(self) -> Tuple[LayerPlan, ...]:
        """The layers whose ``call`` is replaced while the factors are traced."""
        return self.factored + self.local


class CallRecord(NamedTuple):
    """One call of a replaced layer: what it was given, its probe and output, and where its ops are."""

    inputs: Any
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    probe: Optional[tf.Tensor]
    output: Any
    graph: Any
    window: Tuple[int, int]  # indices of the graph's first and past-the-last ops created by the call


def _operation_count(graph: Any, counted: bool) -> int:
    return len(graph.get_operations()) if counted else 0


def _replacement(plan: LayerPlan, calls: List[CallRecord], watch: Callable[[tf.Tensor], None],
                 counted: bool) -> Callable[..., Any]:
    """The ``call`` put on the layer: the adapter's forward (or the layer's own, probed at its output)."""
    original = plan.layer.call

    def call(*args: Any, **kwargs: Any) -> Any:
        inputs, rest = (args[0], args[1:]) if args else (kwargs.pop("inputs", None), ())
        graph = tf.compat.v1.get_default_graph()
        start = _operation_count(graph, counted)
        probes: List[tf.Tensor] = []

        def probe(values: tf.Tensor) -> tf.Tensor:
            zero = tf.zeros_like(values)
            watch(zero)
            probes.append(zero)
            return values + zero

        if not tf.is_tensor(inputs):
            outputs = original(*args, **kwargs) if inputs is None else original(inputs, *rest, **kwargs)
        elif plan.adapter is not None:
            outputs = plan.adapter.forward(plan.layer, probe, inputs, *rest, **kwargs)
            if len(probes) != 1:
                raise RuntimeError(f"{type(plan.adapter).__name__}.forward must call probe exactly once per call of "
                                   f"{plan.layer.name!r}, it did {len(probes)} times.")
        else:
            outputs = original(inputs, *rest, **kwargs)
            if tf.is_tensor(outputs) and outputs.dtype.is_floating:
                outputs = probe(outputs)
        calls.append(CallRecord(inputs, rest, kwargs, probes[0] if probes else None, outputs, graph,
                                (start, _operation_count(graph, counted))))
        return outputs

    return call


@contextlib.contextmanager
def replaced_calls(plans: Sequence[LayerPlan], watch: Callable[[tf.Tensor], None] = lambda tensor: None,
                   counted: bool = False) -> Iterator[List[List[CallRecord]]]:
    """Replace the ``call`` of the planned layers on their instances while the block runs (restored afterwards,
    also when an exception is raised); yields the records of their calls, one list per layer.

    Parameters
    ----------
    plans
        The layers to replace.
    watch
        Called on every probe (e.g. ``tape.watch``).
    counted
        Record the window of graph operations created by each call (for the plan).
    """
    records: List[List[CallRecord]] = [[] for _ in plans]
    replaced: List[keras.layers.Layer] = []
    try:
        for plan, calls in zip(plans, records):
            plan.layer.call = _replacement(plan, calls, watch, counted)
            replaced.append(plan.layer)
        yield records
    finally:
        for layer in reversed(replaced):
            del layer.call  # back to the class's method


# Building the plan -------------------------------------------------------------------------------------------------
def _own_weights(layer: keras.layers.Layer) -> List[Any]:
    """The weights of ``layer`` that none of its sublayers holds."""
    inner = {id(weight) for sub in layer._flatten_layers(include_self=False, recursive=False)  # pylint: disable=W0212
             for weight in sub.weights}
    return [weight for weight in layer.weights if id(weight) not in inner]


def _candidates(kernels: LossKernels) -> Tuple[List[LayerPlan], List[str]]:
    """A plan per layer owning watched weights (with the adapter that accepts it, if any), and the refusals."""
    positions = {id(weight): index for index, weight in enumerate(kernels.watched)}
    plans, refusals, claimed = [], [], set()
    for layer in kernels.model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=W0212
        own = [weight for weight in _own_weights(layer) if id(weight) in positions and id(weight) not in claimed]
        if not own:
            continue
        if "call" in vars(layer):
            refusals.append(f"Layer {layer.name!r}: its call is replaced on the instance.")
            continue
        adapter = layer_adapter(layer)
        if adapter is not None:
            try:
                adapter.check(layer)
                handled = {id(weight) for weight in adapter.weights(layer)}
                if any(id(weight) not in handled for weight in own):
                    raise ValueError(f"Layer {layer.name!r} has watched weights that {type(adapter).__name__} does "
                                     "not differentiate.")
                own = [weight for weight in adapter.weights(layer) if id(weight) in {id(w) for w in own}]
            except ValueError as refusal:  # the adapters' way of refusing a configuration
                refusals.append(str(refusal))
                adapter = None
        claimed.update(id(weight) for weight in own)
        plans.append(LayerPlan(layer, adapter, tuple(own), tuple(positions[id(weight)] for weight in own)))
    return plans, refusals


def _one_row_per_sample(tensor: Any, graph: Any, batch_size: Optional[int]) -> bool:
    if not tf.is_tensor(tensor) or getattr(tensor, "graph", None) is not graph or tensor.shape.rank in (None, 0):
        return False
    return tensor.shape[0] == batch_size


def _call_refusal(plan: LayerPlan, call: CallRecord, graph: Any, batch_size: Optional[int]) -> Optional[str]:
    """Why a call of a planned layer cannot be used, or None."""
    if call.probe is None or not tf.is_tensor(call.inputs):
        return "it is called without one tensor as input (or, without adapter, returns no floating tensor)"
    if call.inputs.graph is not graph:
        return "it is called inside a loop or a nested function"
    if not _one_row_per_sample(call.inputs, graph, batch_size):
        return f"its inputs (shape {call.inputs.shape}) do not have one row per sample"
    if plan.adapter is None:
        tensors = [value for value in tf.nest.flatten((call.args, call.kwargs)) if tf.is_tensor(value)]
        if call.args or tensors or not _one_row_per_sample(call.output, graph, batch_size):
            return "without adapter, it must take and return one tensor with one row per sample"
    return None


def _used_elsewhere(plan: LayerPlan, calls: List[CallRecord], values: List[tf.Tensor], index: Dict[str, int]) -> bool:
    """Whether an op outside the layer's calls uses one of its weights (``index``: the graph's ops by name, in
    order of creation)."""
    windows = [call.window for call in calls]
    for position in plan.positions:
        for consumer in values[position].consumers():
            where = index.get(consumer.name)
            if where is None or not any(start <= where < end for start, end in windows):
                return True
    return False


def batch_specs(batch: Tuple, batch_size: Optional[int]) -> Tuple:
    """Specs of a batch's tensors with the first dimension replaced by ``batch_size`` (None: any size; scalars are
    kept as they are)."""

    def spec(value: Any) -> Any:
        if value is None:
            return None
        tensor = value if tf.is_tensor(value) else tf.convert_to_tensor(value)
        if tensor.shape.rank is None:
            return tf.TensorSpec(None, tensor.dtype)
        shape = tensor.shape.as_list()
        return tf.TensorSpec([batch_size] + shape[1:] if shape else [], tensor.dtype)

    return tf.nest.map_structure(spec, tuple(batch))


def build_plan(kernels: LossKernels, batch: Tuple) -> FactorPlan:
    """The plan of a model's watched weights, from the structure of ``batch`` (its values are not used)."""
    candidates, refusals = _candidates(kernels)
    rejected: Dict[int, str] = {}

    def trace(static_batch: Tuple, dynamic_batch: Tuple) -> tf.Tensor:
        for batch_size, traced in ((_PLAN_BATCH, static_batch), (None, dynamic_batch)):
            graph = tf.compat.v1.get_default_graph()
            values = kernels.unflatten(kernels.flat_weights())
            inputs, targets, sample_weight = kernels.process_batch(traced)
            with replaced_calls(candidates, counted=batch_size is not None) as records:
                kernels.losses_of(values, inputs, targets, sample_weight)
            index = {} if batch_size is None else {operation.name: position for position, operation
                                                    in enumerate(graph.get_operations())}
            for number, (plan, calls) in enumerate(zip(candidates, records)):
                reasons = [_call_refusal(plan, call, graph, batch_size) for call in calls]
                reason = next((reason for reason in reasons if reason is not None), None)
                if not calls:
                    reason = "the model does not call it"
                elif reason is None and batch_size is not None and _used_elsewhere(plan, calls, values, index):
                    reason = "its weights are also used outside its calls"
                if reason is not None:
                    rejected.setdefault(number, f"Layer {plan.layer.name!r}: {reason}.")
        return tf.zeros([])

    if candidates:
        function = tf.function(tf.autograph.experimental.do_not_convert(trace), autograph=False)
        function.get_concrete_function(batch_specs(batch, _PLAN_BATCH), batch_specs(batch, None))
    kept = [plan for number, plan in enumerate(candidates) if number not in rejected]
    covered = {position for plan in kept for position in plan.positions}
    return FactorPlan(factored=tuple(plan for plan in kept if plan.adapter is not None),
                      local=tuple(plan for plan in kept if plan.adapter is None),
                      materialised=tuple(position for position in range(len(kernels.watched))
                                         if position not in covered),
                      refusals=tuple(refusals) + tuple(rejected[number] for number in sorted(rejected)))
