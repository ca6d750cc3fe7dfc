"""Data parallelism over the replicas of a ``tf.distribute`` strategy, batch by batch.

The executor reads each global batch once (checked, counted, in the dataset's order), cuts it into one contiguous
slice per replica (the first ``B mod R`` replicas get one sample more, as ``MirroredStrategy`` splits a global
batch), runs the method's function on every replica with ``strategy.run`` and combines the results:

- **map** (per-sample results): the replicas' rows put together along the samples' axis, in replica order, so the
  results come back in the dataset's order whatever the number of replicas and workers (on one host: concatenated;
  across hosts: each replica's rows placed in a zero tensor of the batch's size and all-reduced, which is exact);
- **sum** (statistics): added on the host over the local replicas, or ``strategy.reduce(SUM)`` (an all-reduce)
  across hosts.

Every worker of a ``MultiWorkerMirroredStrategy`` reads the whole dataset and computes only the slices of its own
replicas (what ``AutoShardPolicy.DATA`` does), so no sample is lost or counted twice and the order is kept. A
replica whose slice is empty (a last batch smaller than the number of replicas) computes one sample and contributes
no rows (map) or zeros (sum), so that every replica takes part in the collectives.

:func:`batch_position` tells a function which rows of the dataset it is computing (batch index, first row of its
slice): what seeded draws per sample (e.g. the true Fisher's labels) need to be independent of the split.
"""
import contextlib
import functools
import logging
import threading
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple

import tensorflow as tf

_POSITION = threading.local()
_EAGER_WARNING = "eagerly has significant overhead"


class _EagerRunFilter(logging.Filter):  # pylint: disable=too-few-public-methods
    """Drops TensorFlow's warning about eager ``strategy.run``: each replica's work is a compiled function, so the
    eager dispatch costs once per batch, which the executor accepts to keep per-batch checks and progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _EAGER_WARNING not in record.getMessage()


_FILTER = _EagerRunFilter()


class BatchPosition(NamedTuple):
    """Where the rows being computed lie in their dataset.

    Attributes
    ----------
    batch_index
        Index of the (global) batch in the dataset.
    row_offset
        Row of the batch at which the computed slice starts (0 without a strategy).
    """

    batch_index: int
    row_offset: int


def batch_position() -> BatchPosition:
    """The position of the rows the current thread is computing (``(0, 0)`` outside an executor's pass)."""
    return getattr(_POSITION, "value", BatchPosition(0, 0))


@contextlib.contextmanager
def at_position(batch_index: int, row_offset: int = 0) -> Iterator[None]:
    """Set :func:`batch_position` for the current thread while the block runs."""
    previous = getattr(_POSITION, "value", None)
    _POSITION.value = BatchPosition(int(batch_index), int(row_offset))
    try:
        yield
    finally:
        _POSITION.value = previous if previous is not None else BatchPosition(0, 0)


def check_strategy(strategy: Any, name: str = "strategy") -> Optional[tf.distribute.Strategy]:
    """``strategy`` if it is a ``tf.distribute.Strategy`` or None; ``TypeError`` otherwise."""
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"{name} must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) or None, "
                        f"got {type(strategy).__name__}.")
    return strategy


def resolve_strategy(strategy: Optional[tf.distribute.Strategy] = None) -> Optional[tf.distribute.Strategy]:
    """The strategy given, else the one whose ``scope()`` is open (``tf.distribute.has_strategy()``), else None."""
    check_strategy(strategy)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def is_distributed(strategy: Optional[tf.distribute.Strategy]) -> bool:
    """Whether passes under ``strategy`` are split across several replicas."""
    return strategy is not None and strategy.num_replicas_in_sync > 1


def in_replica_context() -> bool:
    """Whether the caller runs inside one replica's function of ``strategy.run`` (where a nested pass must stay on
    that replica)."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def replica_bounds(size: int, replicas: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` of every replica's contiguous slice of a batch of ``size`` rows (the first
    ``size mod replicas`` replicas get one row more; trailing replicas may get none)."""
    base, extra = divmod(int(size), int(replicas))
    bounds, start = [], 0
    for replica in range(replicas):
        stop = start + base + (1 if replica < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _replica_id() -> int:
    return int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))


def _rows(structure: Any, start: int, stop: int, axis: int = 0) -> Any:
    def cut(tensor: Any) -> Any:
        if not isinstance(tensor, (tf.Tensor, tf.Variable)) and not hasattr(tensor, "shape"):
            return tensor
        index = [slice(None)] * axis + [slice(start, stop)]
        return tensor[tuple(index)]
    return tf.nest.map_structure(cut, structure)


def run_on_replicas(strategy: tf.distribute.Strategy, function: Callable[[Tuple], Any], batch: Tuple,
                    batch_index: int, axis: Optional[int] = 0) -> Any:
    """``function`` over one global batch, split across the replicas of ``strategy``.

    Parameters
    ----------
    strategy
        A strategy with one or more replicas (every worker of a multi-worker strategy calls this with the same
        batch).
    function
        Maps a slice of the batch to its results: per-sample tensors (rows along ``axis``) or summable statistics.
    batch
        The global batch: a tuple of tensors (or structures of tensors) with B rows.
    batch_index
        Index of the batch in its dataset (see :func:`batch_position`).
    axis
        The samples' axis of every result (their per-replica parts are gathered along it, in replica order), or
        None to sum the results over the replicas.

    Returns
    -------
    The results of the whole batch, in the batch's order (map), or their sum (``axis=None``).
    """
    size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
    bounds = replica_bounds(size, strategy.num_replicas_in_sync)

    def local_slice(context: tf.distribute.InputContext) -> Tuple:
        start, stop = bounds[context.replica_id_in_sync_group]
        return _rows(batch, *((start, stop) if stop > start else (0, 1)))

    def on_replica(part: Tuple) -> Any:
        start, stop = bounds[_replica_id()]
        with at_position(batch_index, start if stop > start else 0):
            result = function(part)
        if stop > start:
            return result
        if axis is None:
            return tf.nest.map_structure(tf.zeros_like, result)
        return _rows(result, 0, 0, axis)

    if _FILTER not in tf.get_logger().filters:
        tf.get_logger().addFilter(_FILTER)
    values = strategy.experimental_distribute_values_from_function(local_slice)
    results = strategy.run(on_replica, args=(values,))
    if worker_count(strategy) == 1:  # every replica is local: combine on the host, in replica order
        def combine(value: Any) -> Any:
            parts = strategy.experimental_local_results(value)
            return functools.reduce(tf.add, parts) if axis is None else tf.concat(parts, axis=axis)
        return tf.nest.map_structure(combine, results)
    if axis is None:
        return tf.nest.map_structure(lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None),
                                     results)
    return _all_gather_by_sum(strategy, results, bounds, axis)


def _all_gather_by_sum(strategy: tf.distribute.Strategy, results: Any, bounds: List[Tuple[int, int]],
                       axis: int) -> Any:
    """The per-replica rows of ``results`` assembled along ``axis`` on every worker: each replica places its rows
    at their place in a zero tensor of the batch's size and the tensors are summed by an all-reduce (exact: every
    entry is one value plus zeros). Eager ``strategy.gather`` across workers builds a new graph on every call."""
    size = bounds[-1][1]

    def placed(value: tf.Tensor) -> tf.Tensor:
        start, stop = bounds[_replica_id()]
        rank = len(value.shape)
        padding = [[0, 0]] * rank
        padding[axis] = [start, size - start - (stop - start)]
        return tf.pad(value, padding)

    scattered = strategy.run(lambda parts: tf.nest.map_structure(placed, parts), args=(results,))
    return tf.nest.map_structure(lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None),
                                 scattered)


def calculator_strategy(calculator: Any) -> Optional[tf.distribute.Strategy]:
    """The strategy given to ``calculator`` itself (``_strategy``), else that of its first influence model that has
    one (``models``, ``model``), else None."""
    explicit = getattr(calculator, "_strategy", None)
    if explicit is not None:
        return explicit
    models = getattr(calculator, "models", None) or [getattr(calculator, "model", None)]
    for model in models:
        strategy = getattr(model, "strategy", None)
        if strategy is not None:
            return strategy
    return None


def worker_count(strategy: Optional[tf.distribute.Strategy]) -> int:
    """Number of worker processes (hosts) of ``strategy`` (1 without one)."""
    if strategy is None:
        return 1
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def value_of_chief(strategy: Optional[tf.distribute.Strategy], value: int) -> int:
    """``value`` as the chief has it, on every worker (a broadcast through an all-reduce; ``value`` itself on one
    host). Every worker must call it at the same point."""
    if worker_count(strategy) == 1:
        return int(value)

    def on_replica() -> tf.Tensor:
        return tf.constant(int(value) if _replica_id() == 0 else 0, tf.int64)

    return int(strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(on_replica), axis=None))


def is_chief(strategy: Optional[tf.distribute.Strategy]) -> bool:
    """Whether this process is the chief of ``strategy``'s cluster (always True on one host): the one that writes
    files shared by all workers."""
    if strategy is None:
        return True
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or worker_count(strategy) == 1:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type in (None, "worker") and not task_id)
