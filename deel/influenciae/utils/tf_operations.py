"""Helpers on Keras models and batched ``tf.data`` datasets.

Everything here is independent of the rest of the library.
"""
import weakref
from typing import Any, Callable, Optional, Tuple, Union

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


def lazy_map(dataset: tf.data.Dataset, function: Callable) -> tf.data.Dataset:
    """``dataset.map(function)`` for a lazily computed result, with tf.data's autotuning switched off: with it on,
    the map's heavy kernels shared the CPU with the autotuning thread and about one pass in three ran one thread at a
    time, 1.8 times slower, on 2 cores (none of six without it; as for :func:`compute_batches`)."""
    return dataset.map(function).with_options(_NO_AUTOTUNE)


def map_to_device(dataset: tf.data.Dataset, function: Callable, device: Optional[str] = None) -> tf.data.Dataset:
    """:func:`lazy_map` of ``function`` with the computation placed on ``get_device(device)``."""
    placement = get_device(device)

    def placed(*element):
        with tf.device(placement):
            return function(*element)

    return lazy_map(dataset, placed)


# The checks of batches moved to batch_checks; these names stay importable from here.
_MOVED_TO_BATCH_CHECKS = ("compute_batches", "CheckedBatches", "check_finite_batch", "non_finite_batch_message",
                          "batch_origin")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_BATCH_CHECKS:
        from . import batch_checks  # pylint: disable=import-outside-toplevel,cyclic-import
        return getattr(batch_checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_count(dataset: tf.data.Dataset) -> Optional[int]:
    """Number of batches of a dataset, or None when it is unknown or infinite."""
    try:
        count = int(tf.data.experimental.cardinality(dataset))
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


def first_batch_size(dataset: tf.data.Dataset) -> int:
    """Number of samples in the first batch of a batched dataset (0 when it is empty)."""
    sizes = dataset.take(1).map(lambda *batch: tf.shape(_first_tensor(batch))[0])
    return next((int(size) for size in sizes), 0)


def random_subset(dataset: tf.data.Dataset, n_samples: Optional[int], seed: Optional[int] = 0,
                  shuffle_buffer_size: int = 10000) -> tf.data.Dataset:
    """``n_samples`` samples drawn without replacement from a batched, finite dataset (the whole dataset when
    ``n_samples`` is None or not smaller), batched like it, with a known cardinality; the same subset on every
    iteration.

    Raises
    ------
    ValueError
        If ``n_samples < 1``.
    """
    if n_samples is None:
        return dataset
    if int(n_samples) < 1:
        raise ValueError(f"n_samples_for_hessian must be >= 1, got {n_samples}.")
    batch_size = first_batch_size(dataset)
    taken = min(int(n_samples), dataset_size(dataset))
    return (dataset.unbatch().shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=False)
            .take(taken).batch(batch_size).apply(tf.data.experimental.assert_cardinality(-(-taken // batch_size))))
