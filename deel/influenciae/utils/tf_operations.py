"""Helpers on Keras models and batched ``tf.data`` datasets.

Everything here is independent of the rest of the library.
"""
import collections
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

_NO_AUTOTUNE = tf.data.Options()
_NO_AUTOTUNE.autotune.enabled = False


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def from_layer_name_to_layer_idx(model: keras.Model, layer_name: str) -> int:
    """Return the position in ``model.layers`` of the layer called ``layer_name``.

    Note that ``Sequential.layers`` excludes the input layer while a Functional model's ``layers`` starts
    with its ``InputLayer``: the same index may name different layers in the two kinds of model.

    Raises
    ------
    ValueError
        If no layer has that name.
    """
    for index, layer in enumerate(model.layers):
        if layer.name == layer_name:
            return index
    raise ValueError(f"No such layer: {layer_name!r}. Existing layers are: {[layer.name for layer in model.layers]}.")


def find_layer(model: keras.Model, layer: Union[str, int]) -> keras.layers.Layer:
    """Find a layer of ``model`` by name (str) or by position in ``model.layers`` (int, negative allowed).

    Raises
    ------
    ValueError
        If the name is unknown or the index out of range.
    TypeError
        If ``layer`` is neither a str nor an int.
    """
    if isinstance(layer, str):
        return model.layers[from_layer_name_to_layer_idx(model, layer)]
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not -len(model.layers) <= int(layer) < len(model.layers):
            raise ValueError(f"Could not find any layer at index {layer}: the model has {len(model.layers)} layers.")
        return model.layers[int(layer)]
    raise TypeError(f"layer must be a layer name (str) or an index (int), got {type(layer).__name__}.")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def _leading_dims(dataset: tf.data.Dataset):
    specs = tf.nest.flatten(dataset.element_spec)
    dims = []
    for spec in specs:
        shape = getattr(spec, "shape", None)
        if shape is None or shape.rank is None or shape.rank == 0:
            return None
        dims.append(shape[0])  # pylint: disable=unsubscriptable-object
    return dims


def is_dataset_batched(dataset: tf.data.Dataset) -> Union[int, bool]:
    """Tell whether a dataset yields batches, from its element specification.

    A dataset is taken as batched when every component of its elements has a leading (batch) dimension and
    these dimensions agree: unknown (``batch(..., drop_remainder=False)``, followed or not by ``map``,
    ``prefetch``, ``cache``...) or the same static size (``drop_remainder=True``). Only in that last case, which
    unbatched samples whose components share their first dimension also match, are the dataset's transformations
    inspected (best effort) to tell the two apart.

    Returns
    -------
    batch_size_or_flag
        The static batch size when known, ``True`` when batched with an unknown size, ``False`` otherwise.
    """
    if not isinstance(dataset, tf.data.Dataset):
        return False
    dims = _leading_dims(dataset)
    if not dims:
        return False
    if all(dim is None for dim in dims):
        return True
    known = {int(dim) for dim in dims if dim is not None}
    if len(known) > 1:
        return False
    if any(dim is None for dim in dims):
        return True
    # Every component has the same static leading size: a batch(..., drop_remainder=True), or unbatched samples
    # whose components happen to share their first dimension. Only then is the pipeline consulted.
    return known.pop() if _pipeline_has_batch(dataset) is not False else False


_BATCHING_DATASETS = ("_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset", "_RebatchDataset",
                      "_DenseToRaggedDataset", "BatchDataset", "PaddedBatchDataset", "ParallelBatchDataset")
_UNBATCHING_DATASETS = ("_UnbatchDataset", "UnbatchDataset")


def _pipeline_has_batch(dataset: tf.data.Dataset) -> Optional[bool]:
    """Walk the transformations behind ``dataset`` (best effort): True if the last (un)batching step batches,
    False if it unbatches or the source is reached without batching, None if the pipeline cannot be read."""
    current = dataset
    for _ in range(1000):
        name = type(current).__name__
        if name in _BATCHING_DATASETS:
            return True
        if name in _UNBATCHING_DATASETS:
            return False
        parent = getattr(current, "_input_dataset", None)
        if not isinstance(parent, tf.data.Dataset):
            return False if "TensorSlice" in name or "Range" in name else None
        current = parent
    return None


def assert_batched_dataset(dataset: tf.data.Dataset, name: str = "dataset") -> None:
    """Raise a clear error unless ``dataset`` is a batched ``tf.data.Dataset``.

    Raises
    ------
    TypeError
        If ``dataset`` is not a ``tf.data.Dataset``.
    ValueError
        If it is not batched.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"{name} must be a batched tf.data.Dataset, got {type(dataset).__name__}.")
    if not is_dataset_batched(dataset):
        raise ValueError(f"{name} must be batched (call .batch(batch_size) on it) before performing this operation; "
                         f"its elements have spec {dataset.element_spec}.")
    if name != "dataset":
        # The public methods all check their datasets here first: remember the argument's name for the errors of
        # compute_batches (which batch of which argument holds NaN), without passing names through every loop.
        _DATASET_NAMES[dataset] = name


def assert_known_cardinality(dataset: tf.data.Dataset, name: str = "dataset") -> int:
    """Return the number of batches of ``dataset``, raising ``ValueError`` if it is unknown or infinite."""
    cardinality = int(dataset.cardinality().numpy())
    if cardinality == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(f"{name} is infinite (e.g. .repeat() without a count); a finite dataset is needed here.")
    if cardinality == int(tf.data.UNKNOWN_CARDINALITY):
        raise ValueError(f"{name} has an unknown number of batches (e.g. after .filter()); call "
                         f".apply(tf.data.experimental.assert_cardinality(n_batches)) on it or rebuild it.")
    return cardinality


def _first_tensor(structure: Any) -> tf.Tensor:
    return tf.nest.flatten(structure)[0]


def batch_sizes(dataset: tf.data.Dataset) -> np.ndarray:
    """Number of samples in every batch of a batched, finite dataset (a short last batch included)."""
    assert_batched_dataset(dataset)
    assert_known_cardinality(dataset)
    sizes = dataset.map(lambda *batch: tf.shape(_first_tensor(batch), out_type=tf.int64)[0])
    return np.fromiter((int(size) for size in sizes.as_numpy_iterator()), dtype=np.int64)


def dataset_size(dataset: tf.data.Dataset) -> int:
    """Number of samples of a batched, finite dataset, counting a short last batch correctly.

    Raises
    ------
    ValueError
        If the dataset is not batched, or its cardinality is unknown or infinite.
    """
    assert_batched_dataset(dataset)
    assert_known_cardinality(dataset)
    count = dataset.reduce(tf.constant(0, tf.int64),
                           lambda total, batch: total + tf.shape(_first_tensor(batch), out_type=tf.int64)[0])
    return int(count.numpy())


# Names given to assert_batched_dataset by the public methods (their argument names), by dataset.
_DATASET_NAMES: "weakref.WeakKeyDictionary[tf.data.Dataset, str]" = weakref.WeakKeyDictionary()
# The last batches yielded (and checked) by compute_batches: id of the first tensor -> (weak reference, name, index).
_CHECKED_BATCHES: "collections.OrderedDict[int, Tuple[Any, str, Optional[int]]]" = collections.OrderedDict()
_MAX_CHECKED_BATCHES = 64
_COMPONENT_NAMES = ("inputs", "targets", "sample weights")


def _registered_dataset(dataset: tf.data.Dataset) -> Tuple[str, Optional[tf.data.Dataset]]:
    """The argument name of ``dataset`` or of the dataset it was derived from (``"dataset"`` if none), and that
    named dataset when it batches differently (a batching transformation lies in between), else None."""
    current, rebatched = dataset, False
    for _ in range(1000):
        if not isinstance(current, tf.data.Dataset):
            break
        name = _DATASET_NAMES.get(current)
        if name is not None:
            return name, current if rebatched else None
        rebatched = rebatched or type(current).__name__ in _BATCHING_DATASETS + _UNBATCHING_DATASETS
        current = getattr(current, "_input_dataset", None)
    return "dataset", None


def _floating_components(batch: Any) -> list:
    """``(component name, tensor)`` for every floating tensor of a batch (ragged/sparse: their values)."""
    parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    found = []
    for position, part in enumerate(parts):
        label = (_COMPONENT_NAMES[position] if len(parts) in (2, 3) else "component") + f" (element {position})"
        for tensor in tf.nest.flatten(part):
            if isinstance(tensor, tf.RaggedTensor):
                tensor = tensor.flat_values
            elif isinstance(tensor, tf.SparseTensor):
                tensor = tensor.values
            dtype = getattr(tensor, "dtype", None)
            if dtype is not None and tf.as_dtype(dtype).is_floating:
                found.append((label, tensor))
    return found


def _first_non_finite(batch: Any) -> Optional[Tuple[str, Optional[int]]]:
    """``(component name, row in the batch)`` of the first non-finite (NaN or inf) floating value of an eager
    batch, or None when every value is finite (the common case costs one reduction per floating tensor)."""
    components = _floating_components(batch)
    if not components:
        return None
    flags = [tf.reduce_all(tf.math.is_finite(tensor)) for _, tensor in components]
    if bool(flags[0] if len(flags) == 1 else tf.reduce_all(tf.stack(flags))):
        return None
    label, tensor = next(item for item, flag in zip(components, flags) if not bool(flag))
    if not tensor.shape.rank:
        return label, None
    per_sample = tf.reduce_all(tf.reshape(tf.math.is_finite(tensor), (tf.shape(tensor)[0], -1)), axis=1)
    return label, int(tf.argmin(tf.cast(per_sample, tf.int32)))


def _non_finite_message(label: str, where: str, sample: str) -> str:
    return (f"Non-finite values (NaN or inf) in the {label} of {where}{sample}: inside the compiled kernels they can "
            "vanish (e.g. relu(NaN) gives 0 in fused kernels) and the results would be silently wrong. Remove or "
            "impute these samples.")


def non_finite_batch_message(batch: Any, name: str) -> Optional[str]:
    """Describe the first non-finite (NaN or inf) floating value of an eager batch called ``name``, or return None
    if all are finite."""
    found = _first_non_finite(batch)
    if found is None:
        return None
    label, row = found
    return _non_finite_message(label, name, "" if row is None else f", sample {row} of the batch")


def _batch_of_sample(dataset: tf.data.Dataset, position: int) -> Optional[int]:
    """Index of the batch of ``dataset`` holding its sample ``position`` (None if past the end)."""
    end = 0
    for index, size in enumerate(batch_sizes(dataset)):
        end += int(size)
        if position < end:
            return index
    return None


def batch_origin(batch: Any) -> Optional[Tuple[str, Optional[int]]]:
    """``(dataset name, batch index or None)`` when ``batch`` was yielded (and so checked) by
    :func:`compute_batches`, None otherwise."""
    first = next(iter(tf.nest.flatten(batch)), None)
    entry = _CHECKED_BATCHES.get(id(first))
    if entry is None or entry[0]() is not first:
        return None
    return entry[1], entry[2]


def check_finite_batch(batch: Any, name: str = "the batch") -> Any:
    """Raise ``ValueError`` if a floating tensor of ``batch`` holds NaN or inf; return ``batch``.

    Batches yielded by :func:`compute_batches` were already checked and pass at no cost. In a graph (e.g. inside
    ``Dataset.map``) nothing can be raised before running: the tensors get ``tf.debugging.assert_all_finite``
    instead (an ``InvalidArgumentError`` when the batch is computed).
    """
    if not tf.executing_eagerly():
        message = (f"Non-finite values (NaN or inf) in {name}: the results would be silently wrong; remove or "
                   "impute these samples.")
        return tf.nest.map_structure(
            lambda tensor: tf.debugging.assert_all_finite(tensor, message)
            if isinstance(tensor, tf.Tensor) and tensor.dtype.is_floating else tensor, batch)
    if batch_origin(batch) is None:
        message = non_finite_batch_message(batch, name)
        if message is not None:
            raise ValueError(message)
    return batch


class CheckedBatches:
    """The batches of a dataset, each checked as it is read, with tf.data's autotuning switched off (see
    :func:`compute_batches`). Iterable as many times as needed; ``options()``, ``cardinality()`` and
    ``element_spec`` are those of the underlying dataset."""

    def __init__(self, dataset: tf.data.Dataset, name: Optional[str] = None):
        self.dataset = dataset.with_options(_NO_AUTOTUNE)
        self.named = None  # the named dataset when `dataset` batches it differently (e.g. ExactIHVP's rebatch)
        self.name = name
        if name is None:
            self.name, self.named = _registered_dataset(dataset)
        self.element_spec = self.dataset.element_spec

    def options(self) -> tf.data.Options:
        """Options of the dataset iterated (autotuning off)."""
        return self.dataset.options()

    def cardinality(self) -> tf.Tensor:
        """Number of batches of the dataset."""
        return self.dataset.cardinality()

    def __iter__(self) -> Iterator:
        name, offset = self.name, 0
        for index, batch in enumerate(self.dataset):
            found = _first_non_finite(batch)
            if found is not None:
                label, row = found
                position = None if row is None else offset + row
                if self.named is not None:  # report the batch as the user batched it
                    index = None if position is None else _batch_of_sample(self.named, position)
                where = name if index is None else f"batch {index} of {name}"
                raise ValueError(_non_finite_message(label, where, "" if position is None else
                                                     f", sample {position} of {name}"))
            first = next(iter(tf.nest.flatten(batch)), None)
            if first is not None:
                _CHECKED_BATCHES[id(first)] = (weakref.ref(first), name, index if self.named is None else None)
                while len(_CHECKED_BATCHES) > _MAX_CHECKED_BATCHES:
                    _CHECKED_BATCHES.popitem(last=False)
                offset += int(first.shape[0]) if first.shape.rank else 0
            yield batch


def compute_batches(dataset: tf.data.Dataset, name: Optional[str] = None) -> CheckedBatches:
    """The batches of ``dataset``, checked one by one as they are read, with tf.data's autotuning switched off:
    for loops that run heavy compiled kernels on each batch.

    Each batch is checked for non-finite floating values (inputs, float targets, sample weights) before it is
    yielded: inside compiled kernels a NaN can vanish (TensorFlow's fused MatMul+BiasAdd+ReLU gives relu(NaN) = 0)
    and give finite, wrong results. The check costs one reduction per floating tensor.

    While such a loop iterates, the autotuning thread competes with the kernels for the CPU: on 2 cores it made
    an exact Hessian (digits MLP, P = 2,410) take 620 ms instead of 370 ms in about half of the runs.

    Parameters
    ----------
    dataset
        A batched dataset.
    name
        The name of the dataset in errors; by default the argument name under which a public method checked it
        (:func:`assert_batched_dataset`), else ``"dataset"``.

    Returns
    -------
    CheckedBatches
        An iterable of the batches (iterating it raises ``ValueError`` at a batch holding NaN or inf, naming the
        dataset, the batch index and the sample).
    """
    return CheckedBatches(dataset, name)


def default_process_batch(batch: Tuple) -> Tuple[Any, Any, Optional[tf.Tensor]]:
    """Split a batch ``(x, y)`` or ``(x, y, sample_weight)`` into ``(inputs, targets, sample_weight or None)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("Each dataset element must be a tuple (inputs, targets) or (inputs, targets, sample_weight); "
                         "pass a process_batch_for_loss_fn for other layouts.")
    sample_weight = batch[2] if len(batch) > 2 else None
    return batch[0], batch[1], sample_weight


def dataset_to_tensor(dataset: tf.data.Dataset) -> Union[tf.Tensor, Tuple[tf.Tensor, ...]]:
    """Concatenate all batches of a dataset.

    Returns
    -------
    tensor or tuple of tensors
        A tensor (N, ...) for datasets of tensors; for datasets of (nested) tuples, the same structure with every
        component concatenated (e.g. ``(x (N, ...), y (N, ...))`` or ``((x, y), values)``).
    """
    assert_batched_dataset(dataset)
    batches = list(dataset)
    if not batches:
        raise ValueError("dataset is empty.")
    concatenated = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)
    return tuple(concatenated) if isinstance(concatenated, list) else concatenated


def extract_only_values(dataset: tf.data.Dataset) -> tf.Tensor:
    """Concatenate the second component (the values) of a dataset of ``(samples, values)`` batches."""
    return dataset_to_tensor(dataset.map(lambda *element: element[1]))


def _as_tensor(array: Any) -> Any:
    if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    return array


def array_to_dataset(array: Any, batch_size: Optional[int] = None, shuffle: bool = False,
                     buffer_size: int = 1000, seed: Optional[int] = None) -> tf.data.Dataset:
    """Build a dataset from an array or a tuple of arrays (one sample per row).

    Floating numpy arrays are cast to float32; a tuple ``(x, y)`` gives elements ``(x_i, y_i)`` whatever the
    shapes of x and y.

    Parameters
    ----------
    array
        Array (N, ...) or tuple of arrays sharing their first dimension N.
    batch_size
        If given, the dataset is batched.
    shuffle
        Shuffle the samples (with ``buffer_size`` and ``seed``).
    """
    if isinstance(array, (tuple, list)):
        array = tuple(_as_tensor(part) for part in array)
    else:
        array = _as_tensor(array)
    dataset = tf.data.Dataset.from_tensor_slices(array)
    if shuffle:
        dataset = dataset.shuffle(buffer_size, seed=seed)
    if batch_size is not None:
        dataset = dataset.batch(batch_size)
    return dataset


def get_device(device: Optional[str] = None) -> str:
    """The device to run on: ``device`` if given, else the first GPU when one is visible, else the CPU."""
    if device is not None:
        return device
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def map_to_device(dataset: tf.data.Dataset, function: Callable, device: Optional[str] = None) -> tf.data.Dataset:
    """``dataset.map(function)`` with the computation placed on ``get_device(device)``."""
    placement = get_device(device)

    def placed(*element):
        with tf.device(placement):
            return function(*element)

    return dataset.map(placed)
