"""Building an influence index: the training-side vectors of a calculator computed once and written as shards.

:func:`build_index` (``calculator.build_index(train_set, path)``) runs ``calculator._compute_influence_vector`` over
the batches of the training set and writes the vectors in the format of :mod:`~.index_format`: shards of
``shard_size`` rows, cast to the storage dtype and checked finite, each written atomically and then listed in the
manifest. At most one shard's worth of vectors (plus one batch) is held. A build that was interrupted (killed,
an exception) resumes when called again with the same calculator, ``dtype`` and ``shard_size``: the batches lying
inside the completed shards are read (to count rows) but not computed, the batch that straddles the last boundary
is computed and its leading rows dropped, so the files are byte-identical to those of an uninterrupted build.
Before resuming, the temporary files and unlisted shard files of the interrupted run are removed and the completed
shards are checked against their SHA-256.
"""
import os
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf

from ..utils.tf_operations import assert_batched_dataset, dataset_size
from .distribution import is_chief, value_of_chief
from .executor import first_dim
from .index_format import (MANIFEST_NAME, TEMP_PREFIX, atomic_save_array, atomic_write_manifest,
                           calculator_fingerprint, check_path, check_positive_int, check_storage_dtype,
                           encode_structure, flatten_vectors, new_manifest, open_shard_file, read_manifest,
                           remove_leftovers, shard_file_name)
from .influence_index import InfluenceIndex, check_calculator, foreign_index_message, index_executor, shard_rows

__all__ = ["build_index"]

_LARGEST = {"float16": 65504.0, "float32": 3.4028234663852886e38}  # finite maxima of the storage dtypes


class _ShardWriter:
    """Buffers the vectors of one shard (cast to the storage dtype and checked) and writes full shards."""

    def __init__(self, directory: str, manifest: Dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        self.shard_size = manifest["shard_size"]
        self.storage = np.dtype(manifest["dtype"])
        self.rows_done = shard_rows(manifest)
        self.buffers: Optional[List[np.ndarray]] = None
        self.filled = 0

    def _leaves(self, vectors: Any, rows: int) -> List[np.ndarray]:
        """The leaves of one batch's vectors as arrays, their structure checked against the manifest's (recorded
        from the first batch)."""
        structure, paths = encode_structure(vectors)
        arrays = []
        for tensor in flatten_vectors(vectors):
            tensor = tf.convert_to_tensor(tensor)
            if tensor.dtype.is_floating and tensor.dtype not in (tf.float16, tf.float32, tf.float64):
                tensor = tf.cast(tensor, tf.float32)
            arrays.append(np.asarray(tensor))
        specs = [{"name": name, "path": path, "shape": [int(size) for size in array.shape[1:]],
                  "dtype": self.storage.name if np.issubdtype(array.dtype, np.floating) else array.dtype.name,
                  "source_dtype": array.dtype.name} for (name, path), array in zip(paths, arrays)]
        if any(array.ndim == 0 or array.shape[0] != rows for array in arrays):
            raise ValueError(f"The influence vectors of a batch of {rows} training samples have shapes "
                             f"{[array.shape for array in arrays]}: every tensor needs one row per sample.")
        if self.manifest["structure"] is None:
            self.manifest["structure"], self.manifest["leaves"] = structure, specs
        elif structure != self.manifest["structure"] or specs != self.manifest["leaves"]:
            raise ValueError(f"The influence vectors of a batch ({[(s['shape'], s['source_dtype']) for s in specs]}) "
                             f"differ from those recorded in {os.path.join(self.directory, MANIFEST_NAME)!r} "
                             f"({[(s['shape'], s.get('source_dtype')) for s in self.manifest['leaves']]}): every "
                             "batch (and a resumed build) must give vectors of one structure, shape and dtype.")
        return arrays

    def add(self, vectors: Any, rows: int, skip: int, first_row: int) -> None:
        """Buffer rows ``skip:`` of one batch's vectors; ``first_row`` is the training row of row ``skip``."""
        arrays = self._leaves(vectors, rows)
        if self.buffers is None:
            self.buffers = [np.empty((self.shard_size, *array.shape[1:]), np.dtype(spec["dtype"]))
                            for array, spec in zip(arrays, self.manifest["leaves"])]
        position = skip
        while position < rows:
            take = min(self.shard_size - self.filled, rows - position)
            for array, buffer, spec in zip(arrays, self.buffers, self.manifest["leaves"]):
                target = buffer[self.filled:self.filled + take]
                with np.errstate(over="ignore", invalid="ignore"):
                    target[...] = array[position:position + take]
                if np.issubdtype(target.dtype, np.floating):
                    self._check_finite(array[position:position + take], target, spec,
                                       first_row + position - skip)
            self.filled += take
            position += take
            if self.filled == self.shard_size:
                self.flush(complete=False)

    def _check_finite(self, source: np.ndarray, stored: np.ndarray, spec: Dict[str, Any], first_row: int) -> None:
        rows = len(stored)
        finite = np.isfinite(stored.reshape(rows, -1)).all(axis=1)
        if finite.all():
            return
        source_finite = np.isfinite(source.reshape(rows, -1)).all(axis=1)
        shard = first_row // self.shard_size
        leaf = "" if spec["name"] == "vectors" else f", {spec['name']} (element {spec['path']} of the vectors)"
        if not source_finite.all():
            bad = (first_row + np.flatnonzero(~source_finite)).tolist()
            raise ValueError(f"The calculator gives non-finite (NaN or inf) influence vectors for training rows "
                             f"{bad[:10]}{' ...' if len(bad) > 10 else ''} (shard {shard}{leaf}): check the "
                             "model's weights, the inputs and the loss (e.g. log of 0 with from_logits=False).")
        bad = (first_row + np.flatnonzero(~finite)).tolist()
        largest = float(np.max(np.abs(source.reshape(rows, -1)[~finite])))
        advice = ("build the index with dtype='float32'" if self.storage == np.float16 else
                  "rescale the model's outputs or the loss")
        raise ValueError(f"Influence vectors of training rows {bad[:10]}{' ...' if len(bad) > 10 else ''} (shard "
                         f"{shard}{leaf}) overflow the storage dtype {self.storage.name} (largest magnitude "
                         f"{largest:.4g}, the largest {self.storage.name} is {_LARGEST[self.storage.name]:.6g}):"
                         f" {advice}.")

    def flush(self, complete: bool) -> None:
        """Write the buffered rows as the next shard (atomically), then the manifest listing it."""
        index = len(self.manifest["shards"])
        files = {}
        if self.filled:
            for spec, buffer in zip(self.manifest["leaves"], self.buffers):
                files[spec["name"]] = atomic_save_array(self.directory, shard_file_name(index, spec["name"]),
                                                        buffer[:self.filled])
            self.manifest["shards"].append({"index": index, "first_row": self.rows_done, "rows": self.filled,
                                            "files": files})
            self.rows_done += self.filled
            self.filled = 0
        if complete:
            self.manifest["complete"], self.manifest["size"] = True, self.rows_done
        atomic_write_manifest(self.directory, self.manifest)


def _check_same_build(directory: str, manifest: Dict[str, Any], fingerprint: str, configuration: Dict[str, Any],
                      dtype: str, shard_size: int) -> None:
    advice = "use another path, or delete this directory to build the index again."
    if manifest["fingerprint"] != fingerprint:
        raise ValueError(foreign_index_message(directory, manifest, fingerprint, configuration) + " To index this "
                         f"calculator, {advice}")
    if manifest["dtype"] != dtype:
        raise ValueError(f"The index at {directory!r} stores dtype={manifest['dtype']!r}, not dtype={dtype!r}: "
                         f"call build_index with dtype={manifest['dtype']!r} to resume or reopen it, or {advice}")
    if manifest["shard_size"] != shard_size:
        raise ValueError(f"The index at {directory!r} has shard_size={manifest['shard_size']}, not "
                         f"shard_size={shard_size}: call build_index with shard_size={manifest['shard_size']} to "
                         f"resume or reopen it, or {advice}")


def _prepare_resume(directory: str, manifest: Dict[str, Any]) -> None:
    """Remove what an interrupted build left and check the completed shards (resume only on top of sound ones)."""
    remove_leftovers(directory, manifest)
    for shard in manifest["shards"]:
        for leaf in manifest["leaves"]:
            open_shard_file(directory, shard["files"][leaf["name"]], shard["rows"], leaf, verify=True)


def _open_for_build(directory: str, fingerprint: str, configuration: Dict[str, Any], dtype: str,
                    shard_size: int) -> Dict[str, Any]:
    """The manifest to build on: the existing index's (checked, leftovers removed) or a new one (written). An index
    without any completed shard keeps nothing: it is started again with the given settings."""
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"path {directory!r} exists and is not a directory: give a new or empty directory for "
                             "the index.")
        if os.path.exists(os.path.join(directory, MANIFEST_NAME)):
            manifest = read_manifest(directory)
            if manifest["complete"] or manifest["shards"]:
                _check_same_build(directory, manifest, fingerprint, configuration, dtype, shard_size)
                if not manifest["complete"]:
                    _prepare_resume(directory, manifest)
                return manifest
        else:
            foreign = sorted(name for name in os.listdir(directory) if not name.startswith(TEMP_PREFIX))
            if foreign:
                raise ValueError(f"path {directory!r} exists and holds files that are not an influence index (no "
                                 f"{MANIFEST_NAME}; found {foreign[:5]}{' ...' if len(foreign) > 5 else ''}): give "
                                 "a new or empty directory for the index.")
    else:
        os.makedirs(directory)
    manifest = new_manifest(fingerprint, configuration, dtype, shard_size)
    remove_leftovers(directory, manifest)
    atomic_write_manifest(directory, manifest)
    return manifest


def _known_size(dataset: tf.data.Dataset) -> Optional[int]:
    """The number of samples of a batched dataset when it can be known without a pass (else None)."""
    try:
        return dataset_size(dataset)
    except (TypeError, ValueError):
        return None


def build_index(calculator: Any, train_set: tf.data.Dataset, path: str, dtype: str = "float16",
                shard_size: int = 10_000, verbose: Optional[bool] = None) -> Optional[InfluenceIndex]:
    """Compute the training-side influence vectors of ``calculator`` once and store them at ``path``.

    Parameters
    ----------
    calculator
        A :class:`~deel.influenciae.common.BaseInfluenceCalculator` (its ``_compute_influence_vector``: (B, D) or
        a structure of (B, ·) tensors per training batch).
    train_set
        Batched dataset of the N training samples, in a fixed order (rows of the index are its iteration order).
    path
        Directory of the index: new, empty, or holding an index of this calculator (resumed when incomplete,
        returned as it is when complete).
    dtype
        Storage dtype of the floating vectors: ``"float16"`` (default) or ``"float32"``.
    shard_size
        Rows per shard file (the last one may be shorter); at most one shard's worth of vectors (plus one batch)
        is held while building.
    verbose
        Progress bar; None: the calculator's ``verbose``.

    Returns
    -------
    InfluenceIndex or None
        The complete index. Under a multi-worker strategy, the chief writes the index and gets it; every other
        worker computes its replicas' part of each batch, writes nothing and gets None.

    Raises
    ------
    ValueError
        ``dtype`` other than float16/float32, ``shard_size`` < 1, an unbatched or empty ``train_set``, a ``path``
        holding something else than an index of this calculator with this ``dtype`` and ``shard_size``, a
        corrupted index, a training set shorter than the rows already written, or non-finite vectors (after
        casting: float16 overflows beyond 65504), naming the rows.
    TypeError
        ``path`` neither a str nor a path, or ``calculator`` without the influence hooks.
    """
    check_calculator(calculator)
    assert_batched_dataset(train_set, "train_set")
    dtype = check_storage_dtype(dtype)
    shard_size = check_positive_int(shard_size, "shard_size")
    directory = check_path(path)
    fingerprint, configuration = calculator_fingerprint(calculator)
    executor = index_executor(calculator, verbose)
    writer = None
    if is_chief(executor.strategy):
        manifest = _open_for_build(directory, fingerprint, configuration, dtype, shard_size)
        if manifest["complete"]:
            size = _known_size(train_set)
            if size is not None and size != manifest["size"]:
                raise ValueError(f"The index at {directory!r} is complete with {manifest['size']} rows but train_set "
                                 f"has {size} samples: it was built from another training set. Use another path, or "
                                 "delete the directory to build the index of this one.")
        else:
            writer = _ShardWriter(directory, manifest)
    # Every worker computes the same batches: the rows to resume at (-1: complete) are the chief's.
    resume_at = value_of_chief(executor.strategy, -1 if writer is None else writer.rows_done)
    if resume_at < 0:  # complete
        if not is_chief(executor.strategy):
            return None
        return InfluenceIndex._open(directory, calculator, manifest, verify=False)  # pylint: disable=W0212
    offset = 0
    for batch in executor.batches(train_set, "influence index", "train_set"):
        rows = first_dim(batch)
        if offset + rows > resume_at:  # batches inside completed shards are read (counted), not computed
            vectors = executor.apply(calculator._compute_influence_vector, batch)  # pylint: disable=protected-access
            skip = max(0, resume_at - offset)
            if writer is not None:
                writer.add(vectors, rows, skip, offset + skip)
        offset += rows
    if offset == 0:
        raise ValueError("train_set is empty.")
    if offset < resume_at:
        raise ValueError(f"train_set has {offset} samples but the index at {directory!r} already holds {resume_at} "
                         "rows computed from its training set: resume with the same training set (same samples, "
                         "order and batches), or delete the directory to build the index again.")
    if writer is None:
        return None
    writer.flush(complete=True)
    return InfluenceIndex._open(directory, calculator, writer.manifest, verify=False)  # pylint: disable=W0212
