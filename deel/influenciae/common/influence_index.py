"""Fit once, query many: a calculator's training-side influence vectors saved on disk and queried without
recomputing them.

:func:`~.index_build.build_index` (``calculator.build_index(train_set, path)``) computes
``calculator._compute_influence_vector`` for every batch of the training set, once, and writes the vectors as NumPy
shards of ``shard_size`` rows; at most one shard's worth of vectors (plus one batch) is held. A killed build resumes
where it stopped: calling it again skips the batches inside the completed shards (they are read, not computed) and
writes byte-identical files.
:class:`InfluenceIndex` reopens the directory in any later process (``InfluenceIndex.load(path, calculator)``, shards
memory-mapped) and answers ``top_k`` and ``influence_matrix`` for test sets: the test side
(``calculator._preprocess_samples``) is held per chunk of test batches that fits the calculator's
``memory_budget_bytes``, the training side is read in blocks of rows and compared with
``calculator._estimate_influence_value_from_influence_vector``, and top-k is a streaming merge: memory is bounded by
the block, not by the number N of training samples.

The files (format version 1) are described in :mod:`~deel.influenciae.common.index_format`: ``manifest.json``
(format, library version, fingerprint of the calculator and the configuration it was built from, storage dtype,
shard size, vector structure, completed shards with their rows and SHA-256, ``complete`` and ``size``) and
``shard_00000.<leaf>.npy`` files, all written atomically.

Values are those of the calculator (same sign convention: positive, the training sample is a proponent of the test
sample), computed from vectors rounded to the storage dtype: ``"float16"`` (default) halves the disk and reading
cost and keeps about 3 significant digits; ``"float32"`` keeps the vectors of float32 models exactly.
"""
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..utils.nearest_neighbors import initial_top_k_state, merge_top_k
from ..utils.progress import progress_bar
from ..utils.sorted_dict import ORDER
from ..utils.tf_operations import assert_batched_dataset, dataset_size, get_device
from .distribution import calculator_strategy
from .executor import Executor, concat_structures, first_dim
from .index_format import (calculator_fingerprint, check_path, check_positive_int, open_shard_file, pack_vectors,
                           read_manifest)
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_wrappers import assert_finite
from .results import TopK
from .self_influence import _check_k

__all__ = ["InfluenceIndex"]

_HOOKS = ("_compute_influence_vector", "_preprocess_samples", "_estimate_influence_value_from_influence_vector")
_MATRIX_BYTES_PER_VALUE = 8  # the matrix and its concatenation temporaries
# Default bytes of a block of training rows in the test side's dtype: large products, bounded memory.
_BLOCK_BYTES = 64 * 2 ** 20


def check_calculator(calculator: Any) -> None:
    """``TypeError`` unless ``calculator`` has the hooks of an influence calculator."""
    missing = [hook for hook in _HOOKS if not callable(getattr(calculator, hook, None))]
    if missing:
        raise TypeError(f"calculator must be an influence calculator (a BaseInfluenceCalculator such as TracIn or "
                        f"FirstOrderInfluenceCalculator), got {type(calculator).__name__} without {missing}.")


def index_executor(calculator: Any, verbose: Optional[bool] = None) -> Executor:
    """The calculator's streaming executor (its device, ``verbose`` and memory budget), ``verbose`` overridden."""
    make = getattr(calculator, "_streaming_executor", None)
    executor = make() if callable(make) else Executor(None, getattr(calculator, "verbose", None), getattr(
        calculator, "memory_budget_bytes", DEFAULT_MEMORY_BUDGET_BYTES), calculator_strategy(calculator))
    if verbose is not None:
        executor.verbose = bool(verbose)
    return executor


def shard_rows(manifest: Dict[str, Any]) -> int:
    """Number of rows of the shards a manifest lists."""
    return sum(shard["rows"] for shard in manifest["shards"])


class InfluenceIndex:
    """Training-side influence vectors of one calculator and one training set, stored on disk, for many queries.

    Build one with ``calculator.build_index(train_set, path)`` (:meth:`~deel.influenciae.common.
    BaseInfluenceCalculator.build_index`) and reopen it with :meth:`load`; the constructor is internal.

    The value of training sample z (row z of the index) for test sample t is the calculator's
    ``I(t, z) = _estimate_influence_value_from_influence_vector(φ(t), v(z))`` with ``φ(t)`` its test side
    (``_preprocess_samples``) and ``v(z)`` the stored vector (rounded to the storage dtype, computed in the test
    side's dtype). Positive: z is a proponent of t.
    """

    def __init__(self, directory: str, calculator: Any, manifest: Dict[str, Any],
                 shards: List[Tuple[int, int, Dict[str, str]]]):
        self._path = directory
        self._calculator = calculator
        self._manifest = manifest
        self._shards = shards

    # Opening ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, calculator: Any, verify: bool = True) -> "InfluenceIndex":
        """Reopen an index written by ``build_index`` (in this or another process); shards are memory-mapped.

        Parameters
        ----------
        path
            The index's directory.
        calculator
            A calculator equal to the one that built the index: same class, configuration and weights (checked by
            their fingerprint).
        verify
            Check every shard's SHA-256 against the manifest (reads every file once). Sizes, shapes and dtypes are
            always checked.

        Raises
        ------
        FileNotFoundError
            If there is no index at ``path``.
        ValueError
            If the calculator's fingerprint differs, the index is incomplete (interrupted: resume it with
            ``build_index``), or a file is corrupted (the message names it).
        """
        check_calculator(calculator)
        directory = check_path(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"No influence index at {directory!r} (no such directory).")
        manifest = read_manifest(directory)
        fingerprint, configuration = calculator_fingerprint(calculator)
        if manifest["fingerprint"] != fingerprint:
            raise ValueError(foreign_index_message(directory, manifest, fingerprint, configuration) +
                             " Load it with the calculator it was built with, or build a new index for this one.")
        if not manifest["complete"]:
            raise ValueError(
                f"The index at {directory!r} is incomplete: its build was interrupted after "
                f"{len(manifest['shards'])} shard(s) ({shard_rows(manifest)} rows). Resume it by calling "
                f"calculator.build_index(train_set, {directory!r}, dtype={manifest['dtype']!r}, "
                f"shard_size={manifest['shard_size']}) again with the same training set; the completed shards are "
                "kept.")
        return cls._open(directory, calculator, manifest, bool(verify))

    @classmethod
    def _open(cls, directory: str, calculator: Any, manifest: Dict[str, Any], verify: bool) -> "InfluenceIndex":
        shards = []
        for shard in manifest["shards"]:
            paths = {}
            for leaf in manifest["leaves"]:
                entry = shard["files"][leaf["name"]]
                open_shard_file(directory, entry, shard["rows"], leaf, verify)  # checked, then unmapped
                paths[leaf["name"]] = os.path.join(directory, entry["file"])
            shards.append((shard["first_row"], shard["rows"], paths))
        return cls(directory, calculator, manifest, shards)

    # Properties -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """N, the number of training samples (rows)."""
        return int(self._manifest["size"])

    @property
    def path(self) -> str:
        """The index's directory."""
        return self._path

    @property
    def dtype(self) -> str:
        """Storage dtype of the floating vectors: ``"float16"`` or ``"float32"``."""
        return self._manifest["dtype"]

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the calculator's class, configuration and weights that the index was built with."""
        return self._manifest["fingerprint"]

    @property
    def shards(self) -> int:
        """Number of shards."""
        return len(self._shards)

    @property
    def shard_size(self) -> int:
        """Rows per shard (the last one may be shorter)."""
        return int(self._manifest["shard_size"])

    @property
    def manifest(self) -> Dict[str, Any]:
        """A copy of the manifest (see :mod:`~deel.influenciae.common.index_format`)."""
        return _copy_json(self._manifest)

    def __repr__(self) -> str:
        return (f"InfluenceIndex(path={self._path!r}, size={self.size}, shards={self.shards}, dtype={self.dtype!r}, "
                f"calculator={self._manifest['configuration'].get('calculator', '?').rsplit('.', 1)[-1]}, "
                f"fingerprint={self.fingerprint[:12]!r})")

    # Queries ------------------------------------------------------------------------------------
    def top_k(self, test_set: tf.data.Dataset, k: int = 5, order: ORDER = ORDER.DESCENDING,
              block_size: Optional[int] = None) -> TopK:
        """The k most (or least) influential training samples of the index for every test sample.

        Parameters
        ----------
        test_set
            Batched dataset of the T samples to explain (batches may differ in size).
        k
            Number of training samples per test sample, 1 <= k <= N.
        order
            ``ORDER.DESCENDING`` (default): the strongest proponents first; ``ORDER.ASCENDING``: the strongest
            opponents first.
        block_size
            Training rows read and compared at once (blocks do not span shards). Default: a shard, or fewer rows
            when a shard's vectors in the test side's dtype would exceed the calculator's ``memory_budget_bytes``.

        Returns
        -------
        TopK
            ``values`` (T, k) in the test side's dtype, ``indices`` (T, k) int64 positions in the training set's
            iteration order, ``samples`` None. Ties keep the earlier training sample.

        Raises
        ------
        ValueError
            If ``k`` is not in [1, N], ``block_size`` < 1, ``test_set`` is not batched or empty, or a value is not
            finite.
        TypeError
            If ``order`` is not an ``ORDER`` member.
        """
        k = _check_k(k)
        if not isinstance(order, ORDER):
            raise TypeError(f"order must be an ORDER member (ORDER.DESCENDING or ORDER.ASCENDING), got {order!r}.")
        assert_batched_dataset(test_set, "test_set")
        if k > self.size:
            raise ValueError(f"k={k} is larger than the number of training samples ({self.size}).")
        block_size = None if block_size is None else check_positive_int(block_size, "block_size")
        values, indices = [], []
        for count, test_side in self._test_chunks(test_set):
            state = None
            for block in self._value_blocks(test_side, block_size, "index top-k"):
                if state is None:
                    state = initial_top_k_state(count, k, (), block.dtype, order)
                state = merge_top_k(state, block, (), k, order)
            values.append(state[0])
            indices.append(state[1])
        if not values:
            raise ValueError("test_set is empty.")
        return TopK(tf.concat(values, axis=0), tf.concat(indices, axis=0), None)

    def influence_matrix(self, test_set: tf.data.Dataset, block_size: Optional[int] = None) -> tf.Tensor:
        """Influence of every training sample of the index on every test sample: (T, N).

        Parameters
        ----------
        test_set
            Batched dataset of the T samples to explain.
        block_size
            As in :meth:`top_k`.

        Raises
        ------
        ValueError
            If T × N × 8 bytes exceed the calculator's ``memory_budget_bytes`` (use :meth:`top_k`), ``test_set``
            is not batched or empty, or a value is not finite.
        """
        assert_batched_dataset(test_set, "test_set")
        block_size = None if block_size is None else check_positive_int(block_size, "block_size")
        if int(test_set.cardinality()) >= 0:  # known: refuse before computing anything
            self._check_matrix_fits(dataset_size(test_set))
        rows, total = [], 0
        for count, test_side in self._test_chunks(test_set):
            total += count
            self._check_matrix_fits(total)
            rows.append(tf.concat(list(self._value_blocks(test_side, block_size, "index influence matrix")), axis=1))
        if not rows:
            raise ValueError("test_set is empty.")
        return tf.concat(rows, axis=0)

    # Machinery ----------------------------------------------------------------------------------
    def _check_matrix_fits(self, test_samples: int) -> None:
        budget = index_executor(self._calculator).memory_budget_bytes
        needed = test_samples * self.size * _MATRIX_BYTES_PER_VALUE
        if needed > budget:
            raise ValueError(f"influence_matrix would hold {test_samples} x {self.size} values ({needed} bytes with "
                             f"its temporaries), more than the calculator's memory_budget_bytes={budget}: use "
                             "top_k(test_set, k), which streams the training side, query fewer test samples at a "
                             "time, or raise memory_budget_bytes.")

    def _test_chunks(self, test_set: tf.data.Dataset) -> Iterator[Tuple[int, Any]]:
        """``(number of test samples, their test side)`` per chunk of test batches whose test side fits the
        calculator's ``memory_budget_bytes``."""
        executor = index_executor(self._calculator)
        placement = get_device(executor.device)
        sides: List[Any] = []
        held, count = 0, 0
        for batch in executor.batches(test_set, None, "test_set"):
            with tf.device(placement):
                sides.append(self._calculator._preprocess_samples(batch))  # pylint: disable=protected-access
            held += structure_bytes(sides[-1])
            count += first_dim(batch)
            if held >= executor.memory_budget_bytes:
                yield count, concat_structures(sides)
                sides, held, count = [], 0, 0
        if sides:
            yield count, concat_structures(sides)

    def _block_rows(self, block_size: Optional[int], compute_dtype: np.dtype) -> int:
        if block_size is not None:
            return block_size
        per_row = sum(int(np.prod(leaf["shape"], dtype=np.int64)) *
                      (compute_dtype.itemsize if leaf["dtype"] in ("float16", "float32") else
                       np.dtype(leaf["dtype"]).itemsize) for leaf in self._manifest["leaves"])
        budget = min(index_executor(self._calculator).memory_budget_bytes, _BLOCK_BYTES)
        return int(max(1, min(self.shard_size, budget // max(1, per_row))))

    def _blocks(self, rows_per_block: int, compute_dtype: np.dtype) -> Iterator[Any]:
        """Vectors of the training rows, in order, ``rows_per_block`` at a time (floating leaves cast to
        ``compute_dtype``)."""
        for _, rows, paths in self._shards:
            # Mapped for one shard at a time: the pages read count in the resident memory until the map is dropped.
            arrays = {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
            for start in range(0, rows, rows_per_block):
                stop = min(rows, start + rows_per_block)
                leaves = {name: tf.convert_to_tensor(np.asarray(array[start:stop], dtype=compute_dtype)
                                                     if np.issubdtype(array.dtype, np.floating) else
                                                     np.asarray(array[start:stop]))
                          for name, array in arrays.items()}
                yield pack_vectors(self._manifest["structure"], leaves)
            del arrays

    def _value_blocks(self, test_side: Any, block_size: Optional[int], description: str) -> Iterator[tf.Tensor]:
        """Values (T, rows) of every block of training rows for the held test side, in order."""
        floating = [tensor.dtype for tensor in tf.nest.flatten(test_side) if tensor.dtype.is_floating]
        compute_dtype = np.dtype((floating[0] if floating else tf.float32).as_numpy_dtype)
        rows_per_block = self._block_rows(block_size, compute_dtype)
        total = sum(-(-rows // rows_per_block) for _, rows, _ in self._shards)
        executor = index_executor(self._calculator)
        placement = get_device(executor.device)
        estimate = self._calculator._estimate_influence_value_from_influence_vector  # pylint: disable=W0212
        for block in progress_bar(self._blocks(rows_per_block, compute_dtype), total, description, executor.verbose):
            with tf.device(placement):
                values = estimate(test_side, block)
            assert_finite(values, "influence values")
            yield values


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def foreign_index_message(directory: str, manifest: Dict[str, Any], fingerprint: str,
                          configuration: Dict[str, Any]) -> str:
    """The start of the error raised when a calculator's fingerprint differs from the index's."""
    built = manifest["configuration"]
    return (f"The index at {directory!r} was built with another model/method/configuration: fingerprint "
            f"{manifest['fingerprint'][:12]}... of {built.get('calculator', '?')} (configuration "
            f"{built.get('configuration')}, weights sha256 {str(built.get('weights_sha256'))[:12]}...), this "
            f"calculator's is {fingerprint[:12]}... of {configuration['calculator']} (configuration "
            f"{configuration['configuration']}, weights sha256 {configuration['weights_sha256'][:12]}...).")
