"""Memory budgets: the default budget and the size of tensors held."""
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

# Default budget of what a computation may hold beyond its inputs (the same default everywhere).
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 1024 ** 3


def structure_bytes(structure: Any) -> int:
    """Bytes held by the tensors of a structure (tensors, arrays, nested tuples/lists/dicts of them)."""
    total = 0
    for tensor in tf.nest.flatten(structure):
        dtype = tf.as_dtype(tensor.dtype)
        total += int(np.prod(tensor.shape)) * dtype.size
    return total


def bytes_per_sample(structure: Any) -> Optional[int]:
    """Bytes per sample of a structure of tensors, symbolic tensors or specs whose first axis is the samples'
    (None entries skipped); None when a non-batch dimension is unknown."""
    total = 0
    for tensor in tf.nest.flatten(structure):
        if tensor is None:
            continue
        shape = tf.TensorShape(tensor.shape)  # (tuples for Keras' symbolic tensors)
        shape = shape.as_list()[1:] if shape.rank is not None else [None]
        if any(size is None for size in shape):
            return None
        total += int(np.prod(shape)) * tf.as_dtype(tensor.dtype).size
    return total


# What one call on a merged batch may hold in layer outputs (see merged_batch_rows).
MERGED_BATCH_BYTES = 32 * 1024 ** 2


def _layers_output_bytes(layers: Sequence[Any]) -> Optional[int]:
    """Bytes per sample of the first outputs of ``layers`` and of the layers nested in them; None when a layer was
    never called on symbolic inputs (a subclassed model) or an output's non-batch shape is not fully known."""
    total = 0
    for layer in layers:
        try:
            outputs = tf.nest.flatten(layer.output)
        except (AttributeError, ValueError):
            return None
        size = bytes_per_sample(outputs)
        if size is None:
            return None
        total += size
        nested = getattr(layer, "layers", None)
        if nested:
            inner = _layers_output_bytes(nested)
            if inner is None:
                return None
            total += inner
    return total


def activation_bytes_per_sample(model: Any) -> Optional[int]:
    """Bytes of the layer outputs of one sample in a forward pass of a Keras model built on symbolic inputs
    (functional or Sequential; nested models included): the sum over its layers of their output sizes. None when
    they are unknown (a subclassed model, a variable-length dimension)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    return _layers_output_bytes(layers)


def merged_batch_rows(models: Sequence[Any], memory_budget_bytes: int) -> int:
    """The number of rows up to which consecutive small batches may be merged for one call that runs a forward and
    a backward pass of every model in ``models`` (Keras models): ``MERGED_BATCH_BYTES`` (or 1/16 of
    ``memory_budget_bytes`` when less) over three times the models' layer outputs per sample (outputs, their
    gradients and what the products keep). 0 (merge nothing) when a model's layer outputs are unknown.

    On small models each call costs more in dispatch than in arithmetic (the digits MLP: 1.4 ms per call for four
    checkpoints, 0.4 ms more for 256 training samples), so fewer, larger calls are faster; on CNNs and transformers
    a sample's layer outputs are so large that nothing is merged."""
    per_sample = 0
    for model in models:
        size = activation_bytes_per_sample(model)
        if size is None:
            return 0
        per_sample += 3 * size
    if per_sample <= 0:
        return 0
    return int(min(MERGED_BATCH_BYTES, int(memory_budget_bytes) // 16) // per_sample)
