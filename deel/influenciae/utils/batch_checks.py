"""Checks of the batches read by the library's loops: non-finite values are reported with the dataset's name,
the batch and the sample."""
import collections
import weakref
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from .tf_operations import _BATCHING_DATASETS, _DATASET_NAMES, _NO_AUTOTUNE, _UNBATCHING_DATASETS, batch_sizes

# The last batches yielded (and checked) by compute_batches: id of the first tensor -> (weak reference, name, index).
_CHECKED_BATCHES: "collections.OrderedDict[int, Tuple[Any, str, Optional[int]]]" = collections.OrderedDict()
_MAX_CHECKED_BATCHES = 64
_COMPONENT_NAMES = ("inputs", "targets", "sample weights")
# Floating dtypes whose host-memory tensors are checked with NumPy (see _all_finite).
_HOST_CHECKED_DTYPES = (tf.float16, tf.float32, tf.float64)
# The dataset iterated for each input dataset (autotuning off), kept while the input dataset lives.
_UNTUNED: "weakref.WeakKeyDictionary[tf.data.Dataset, tf.data.Dataset]" = weakref.WeakKeyDictionary()


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


def _all_finite(tensor: tf.Tensor) -> Any:
    """Whether every value of an eager floating tensor is finite: a NumPy reduction over the tensor's buffer when
    it lies in host memory (float16/32/64: no TensorFlow operation to dispatch), else one reduction on its device
    (a boolean scalar tensor)."""
    if tensor.dtype in _HOST_CHECKED_DTYPES and tensor.device.endswith("CPU:0"):
        return bool(np.isfinite(tensor.numpy()).all())
    return tf.reduce_all(tf.math.is_finite(tensor))


def _first_non_finite(batch: Any) -> Optional[Tuple[str, Optional[int]]]:
    """``(component name, row in the batch)`` of the first non-finite (NaN or inf) floating value of an eager
    batch, or None when every value is finite (the common case costs one reduction per floating tensor)."""
    components = _floating_components(batch)
    if not components:
        return None
    flags = [_all_finite(tensor) for _, tensor in components]
    if all(bool(flag) for flag in flags):
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


def untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning switched off (see :func:`compute_batches`), built once per dataset
    (building it costs about 0.6 ms, as much as reading a few small batches)."""
    found = _UNTUNED.get(dataset)
    if found is None:
        found = _UNTUNED[dataset] = dataset.with_options(_NO_AUTOTUNE)
    return found


class CheckedBatches:
    """The batches of a dataset, each checked as it is read, with tf.data's autotuning switched off (see
    :func:`compute_batches`). Iterable as many times as needed; ``options()``, ``cardinality()`` and
    ``element_spec`` are those of the underlying dataset."""

    def __init__(self, dataset: tf.data.Dataset, name: Optional[str] = None):
        self.dataset = untuned(dataset)
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

    While such a loop iterates, the autotuning thread competes with the kernels for the CPU: on 2 cores it slowed
    an exact Hessian down by more than half in about half of the runs.

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
