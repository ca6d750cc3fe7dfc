"""Retrain a model on subsets of the training set and measure it: the ground truth of the linear datamodeling score
and of leave-one-out checks, cached on disk so that an interrupted run resumes where it stopped."""
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from ..utils.progress import progress_bar

TrainFunction = Callable[[tf.data.Dataset, int], keras.Model]
MeasureFunction = Callable[[keras.Model], object]


def _masks_digest(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(masks, axis=1).tobytes() + str(masks.shape).encode()).hexdigest()


def _subset_dataset(train_set: tf.data.Dataset, keep: np.ndarray) -> tf.data.Dataset:
    """The samples ``keep`` (N,) selects, in order, with their count as the dataset's known cardinality."""
    kept = tf.constant(keep)
    subset = train_set.enumerate().filter(lambda index, _: tf.gather(kept, index)).map(lambda _, sample: sample)
    return subset.apply(tf.data.experimental.assert_cardinality(int(np.count_nonzero(keep))))


def _open_cache(cache_dir: Union[str, os.PathLike], masks: np.ndarray) -> Path:
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"masks_sha256": _masks_digest(masks), "shape": list(masks.shape)}
    path = folder / "manifest.json"
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != manifest:
            raise ValueError(f"cache_dir {str(folder)!r} holds the outputs of other subsets ({stored['shape']}); "
                             "use another folder or delete it.")
    else:
        path.write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def retrain_outputs(train_fn: TrainFunction, train_set: tf.data.Dataset, masks: object, measure_fn: MeasureFunction,
                    seeds: Sequence[int] = (0,), cache_dir: Optional[Union[str, os.PathLike]] = None,
                    verbose: Optional[bool] = None) -> np.ndarray:
    """Train one model per subset and seed and measure it on the test samples.

    For every subset m and seed s: the global random generators are seeded with ``keras.utils.set_random_seed(s)``,
    ``model = train_fn(subset_m, s)`` is trained on the samples the subset keeps (an **unbatched** dataset in the
    original order: batch and shuffle it inside ``train_fn``) and ``measure_fn(model)`` gives the (T,) outputs.
    ``measure_fn`` is called right after ``train_fn``, so a ``train_fn`` may reuse (re-initialise) one model.

    Parameters
    ----------
    train_fn
        ``train_fn(train_subset, seed) -> keras.Model``.
    train_set
        Unbatched ``tf.data.Dataset`` of the N training samples.
    masks
        (M, N) boolean subset masks (:func:`random_subset_masks`).
    measure_fn
        ``measure_fn(model) -> (T,)`` outputs, larger meaning better (e.g. minus the per-test-sample loss).
    seeds
        Retraining seeds S.
    cache_dir
        Folder where each (subset, seed) result is written as soon as it is measured; results already there are
        read instead of recomputed (a run killed after k subsets resumes at subset k). The folder remembers the
        masks and refuses other ones.
    verbose
        Progress bar (None: only in an interactive session).

    Returns
    -------
    np.ndarray
        (S, M, T) float64 outputs; average over axis 0 for :func:`linear_datamodeling_score`.

    Raises
    ------
    ValueError
        If ``train_set`` is batched or its size differs from the masks', if ``seeds`` is empty, if a measurement is
        not finite, or if measurements disagree in length.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be (M, N), got shape {masks.shape}.")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed.")
    if not isinstance(train_set, tf.data.Dataset):
        raise TypeError(f"train_set must be an unbatched tf.data.Dataset, got {type(train_set).__name__}.")
    size = int(train_set.cardinality())
    if size >= 0 and size != masks.shape[1]:
        raise ValueError(f"train_set has {size} elements but the masks cover N = {masks.shape[1]}; "
                         "give the unbatched training set.")
    folder = None if cache_dir is None else _open_cache(cache_dir, masks)
    outputs_of = {}
    jobs = [(seed, index) for seed in seeds for index in range(masks.shape[0])]
    for seed, index in progress_bar(jobs, len(jobs), "retraining on subsets", verbose):
        path = None if folder is None else folder / f"subset_{index:06d}_seed_{seed}.npy"
        if path is not None and path.exists():
            outputs = np.load(path)
        else:
            outputs = _train_and_measure(train_fn, _subset_dataset(train_set, masks[index]), measure_fn, seed, index)
            if path is not None:
                partial = path.with_name(path.stem + ".partial.npy")
                np.save(partial, outputs)
                os.replace(partial, path)
        first = outputs_of.get(jobs[0])
        if first is not None and outputs.shape != first.shape:
            raise ValueError(f"measure_fn gave {outputs.shape[0]} outputs for subset {index}, seed {seed}, "
                             f"and {first.shape[0]} for the first subset.")
        outputs_of[(seed, index)] = outputs
    return np.stack([np.stack([outputs_of[(seed, index)] for index in range(masks.shape[0])]) for seed in seeds])


def _train_and_measure(train_fn: TrainFunction, subset: tf.data.Dataset, measure_fn: MeasureFunction, seed: int,
                       index: int) -> np.ndarray:
    """Seed the global generators, train on one subset, measure: (T,) float64 outputs."""
    keras.utils.set_random_seed(seed)
    model = train_fn(subset, seed)
    outputs = np.asarray(measure_fn(model), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(outputs)):
        raise ValueError(f"measure_fn gave a non-finite output for subset {index}, seed {seed}.")
    return outputs
