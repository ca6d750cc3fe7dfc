"""The one place where the library loops over batches of data.

Every pass over a dataset (per-sample gradients, influence vectors, Hessian sums, Hessian-vector products over a
dataset, streamed pairwise blocks) goes through an :class:`Executor`: it reads the batches (each checked for
non-finite values as it is read), places the computation on the chosen device, reports progress, and offers the
two primitives the methods need: **map** (one result per batch, yielded or concatenated) and **sum-reduce** (a sum
over batches and the number of samples). Under a ``tf.distribute`` strategy with several replicas, every batch is
split across the replicas and the results gathered (map) or all-reduced (sum): see :mod:`.distribution`.
"""
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import tensorflow as tf

from ..utils.batch_checks import compute_batches
from ..utils.progress import progress_bar, resolve_verbose
from ..utils.tf_operations import batch_count, get_device
from .distribution import at_position, check_strategy, in_replica_context, is_distributed, run_on_replicas
from .memory import DEFAULT_MEMORY_BUDGET_BYTES


class EmptyDatasetError(ValueError):
    """A pass over a dataset found no batch."""


def concat_structures(parts: List[Any], axis: int = 0) -> Any:
    """Concatenate a list of equally structured batches along ``axis`` (default: their first)."""
    return tf.nest.map_structure(lambda *tensors: tf.concat(tensors, axis=axis), *parts)


def first_dim(structure: Any) -> int:
    """Number of rows (samples) of a batch structure."""
    return int(tf.shape(tf.nest.flatten(structure)[0])[0])


def _static_rows(batch: Tuple) -> Optional[int]:
    """Number of samples of an eager batch of dense tensors (read from their shapes), None for other batches."""
    tensors = tf.nest.flatten(batch)
    if not tensors or not all(isinstance(tensor, tf.Tensor) and tensor.shape.rank for tensor in tensors):
        return None
    return tensors[0].shape[0]


def merged_batches(batches: Iterable[Tuple], rows: int) -> Iterator[Tuple]:
    """Consecutive ``batches`` concatenated while they hold at most ``rows`` samples together, in order; batches
    that are not all dense tensors, or larger than ``rows`` alone, are yielded as they are."""
    pending: List[Tuple] = []
    pending_rows = 0
    for batch in batches:
        count = _static_rows(batch)
        if pending and (count is None or pending_rows + count > rows):
            yield pending[0] if len(pending) == 1 else concat_structures(pending)
            pending, pending_rows = [], 0
        if count is None:
            yield batch
            continue
        pending.append(batch)
        pending_rows += count
    if pending:
        yield pending[0] if len(pending) == 1 else concat_structures(pending)


class Executor:
    """Runs functions over the batches of a dataset.

    Parameters
    ----------
    device
        Device of the computation (default: a GPU when one is visible, else the CPU).
    verbose
        Progress bars: None (default) shows them in interactive sessions only (never under CI or pytest).
    memory_budget_bytes
        What a pass may hold beyond its inputs; callers read it to decide between holding and streaming.
    strategy
        A ``tf.distribute.Strategy``: with several replicas, each batch is split across them (``device`` is then
        ignored: each replica computes on its own device). None (default): one device.
    """

    def __init__(self, device: Optional[str] = None, verbose: Optional[bool] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 strategy: Optional[tf.distribute.Strategy] = None):
        self.device = device
        self.verbose = verbose
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.strategy = check_strategy(strategy)
        self._batch_index = 0

    def apply(self, function: Callable[[Tuple], Any], batch: Tuple, axis: Optional[int] = 0,
              batch_index: Optional[int] = None) -> Any:
        """``function(batch)`` for one batch read by :meth:`batches`: on the executor's device, or split across the
        replicas of its strategy, the per-replica results gathered along ``axis`` (the samples' axis of every result)
        or summed (``axis=None``).

        ``batch_index`` (default: the index of the last batch read) is what :func:`~.distribution.batch_position`
        reports to ``function``."""
        index = self._batch_index if batch_index is None else int(batch_index)
        if in_replica_context():  # a pass inside one replica's work (e.g. a solve per sample) stays on its device
            with at_position(index, 0):
                return function(batch)
        if is_distributed(self.strategy):
            return run_on_replicas(self.strategy, function, batch, index, axis)
        with tf.device(get_device(self.device)), at_position(index, 0):
            return function(batch)

    def batches(self, dataset: tf.data.Dataset, description: Optional[str] = None,
                name: Optional[str] = None, merge_rows: int = 0) -> Iterator[Tuple]:
        """The batches of ``dataset`` as tuples, checked as they are read, with a progress bar when
        ``description`` is given; errors name the dataset ``name`` (default: the argument name under which a
        public method checked it).

        ``merge_rows`` > 0 concatenates consecutive batches of dense tensors while they hold at most that many
        samples together (a larger batch is yielded as it is; the order of the samples is kept): for passes whose
        per-sample results do not depend on the batching, on models small enough for the calls' dispatch to cost
        more than their arithmetic (see :func:`~.memory.merged_batch_rows`)."""
        checked = compute_batches(dataset, name)
        shown = description is not None and resolve_verbose(self.verbose)  # (counting the batches costs a call)
        items = progress_bar(checked, batch_count(dataset), description, True) if shown else checked
        as_tuples = (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,) for batch in items)
        for index, batch in enumerate(merged_batches(as_tuples, merge_rows) if merge_rows > 0 else as_tuples):
            self._batch_index = index
            yield batch

    def map(self, function: Callable[[Tuple], Any], dataset: tf.data.Dataset, description: Optional[str] = None,
            name: Optional[str] = None, axis: int = 0) -> Iterator[Any]:
        """``function(batch)`` for every batch, lazily (one result at a time); ``axis`` is the samples' axis of the
        results (see :meth:`apply`)."""
        for result, _ in self.map_with_batches(function, dataset, description, name, axis):
            yield result

    def map_with_batches(self, function: Callable[[Tuple], Any], dataset: tf.data.Dataset,
                         description: Optional[str] = None, name: Optional[str] = None,
                         axis: int = 0) -> Iterator[Tuple[Any, Tuple]]:
        """``(function(batch), batch)`` for every batch, lazily."""
        for index, batch in enumerate(self.batches(dataset, description, name)):
            yield self.apply(function, batch, axis, index), batch

    def concat(self, function: Callable[[Tuple], Any], dataset: tf.data.Dataset, description: Optional[str] = None,
               name: Optional[str] = None, axis: int = 0) -> Any:
        """The results of ``function`` over every batch, concatenated along ``axis`` (the samples' axis).

        Raises
        ------
        ValueError
            If the dataset is empty (the message names it ``name``).
        """
        results = list(self.map(function, dataset, description, name, axis))
        if not results:
            raise EmptyDatasetError(f"{dataset_name(dataset, name)} is empty.")
        return concat_structures(results, axis)

    def gather(self, dataset: tf.data.Dataset, name: Optional[str] = None) -> Any:
        """Every batch of ``dataset`` concatenated in memory: the dataset's structure with N rows (read, not
        distributed)."""
        parts = list(self.batches(dataset, None, name))
        if not parts:
            raise EmptyDatasetError(f"{dataset_name(dataset, name)} is empty.")
        return concat_structures(parts)

    def sum(self, function: Callable[[Tuple], Any], dataset: tf.data.Dataset, description: Optional[str] = None,
            name: Optional[str] = None, accumulate: Optional[tf.DType] = None) -> Tuple[Any, int]:
        """``(Σ_batches function(batch), number of samples)``.

        Parameters
        ----------
        accumulate
            dtype of the running sum when there are several batches (e.g. float64 for a Hessian); a single batch's
            result is returned as computed.

        Raises
        ------
        ValueError
            If the dataset is empty.
        """
        total, count = None, 0
        for index, batch in enumerate(self.batches(dataset, description, name)):
            result = self.apply(function, batch, None, index)
            if total is None:
                total = result
            else:
                total = tf.nest.map_structure(
                    lambda left, right: _cast(left, accumulate) + _cast(right, accumulate), total, result)
            count += first_dim(batch)
        if total is None:
            raise EmptyDatasetError(f"{dataset_name(dataset, name)} is empty.")
        return total, count


def dataset_name(dataset: tf.data.Dataset, name: Optional[str] = None) -> str:
    """``name``, else the argument name under which a public method checked ``dataset`` (or ``"dataset"``)."""
    return name or compute_batches(dataset).name


def _cast(tensor: tf.Tensor, dtype: Optional[tf.DType]) -> tf.Tensor:
    return tensor if dtype is None else tf.cast(tensor, dtype)
