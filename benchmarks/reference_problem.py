"""The problem of ``compare_reference.py`` and the phases both sides time.

The data split, the trained weights and the problem file both sides read, and :func:`run_phases`, which the driver's
worker (this library) and ``reference_runner.py`` (the reference, in its own environment) both call. Imports nothing
but NumPy at module level: ``reference_runner.py`` imports this module where ``deel.influenciae`` is the reference;
the builders of this library are imported inside the functions that only the driver calls.
"""
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reference_report import PHASES

LAYER_SIZES = (64, 32, 16, 10)


# -------- Problem: data and trained weights -----------------------------------------------
def load_digits_split(n_train: int, n_test: int, seed: int) -> Dict[str, np.ndarray]:
    """Split scikit-learn's bundled digits (no network needed) into train and test sets.

    Parameters
    ----------
    n_train
        Number of training samples: the first ones of the seeded permutation.
    n_test
        Number of test samples (the next ones, disjoint from the training samples).
    seed
        Seed of the permutation.

    Returns
    -------
    dict
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` as float32 arrays; inputs scaled to
        [0, 1], targets one-hot.
    """
    # Imported here: reference_runner.py imports this module in the reference's environment.
    from deel.influenciae.benchmark.digits import load_digits_split as split  # pylint: disable=C0415

    return split(seed, n_train=n_train, n_test=n_test, test_first=False).arrays(as_one_hot=True)


def build_mlp(layer_sizes: Sequence[int], weights: Optional[List[np.ndarray]] = None, seed: Optional[int] = None
              ) -> Any:
    """Build the Keras 3 MLP (ReLU hidden layers, logits output, Dense layers named ``dense_0``, ``dense_1``, ...).

    Parameters
    ----------
    layer_sizes
        Input width followed by the width of every Dense layer.
    weights
        Weights to load, in ``get_weights()`` order (default: keep the random initialisation).
    seed
        Seed of Python, NumPy and the backend, set before the layers are made (default: not set).

    Returns
    -------
    keras.Sequential
        The built model.
    """
    from deel.influenciae.benchmark.digits import build_mlp as build  # pylint: disable=import-outside-toplevel

    sizes = [int(size) for size in layer_sizes]
    return build((sizes[0],), sizes[1:-1], sizes[-1], layer_names=[f"dense_{index}" for index in range(len(sizes) - 1)],
                 weights=weights, seed=seed)


def train_weights(data: Dict[str, np.ndarray], epochs: int, seed: int) -> Tuple[List[np.ndarray], float]:
    """Train the MLP with Keras 3 (seeded) and return its weights.

    Parameters
    ----------
    data
        Output of :func:`load_digits_split`.
    epochs
        Number of training epochs (Adam, learning rate 1e-2, batch 32).
    seed
        Seed of Python, NumPy and the backend.

    Returns
    -------
    tuple
        The weights in ``get_weights()`` order and the test accuracy.
    """
    from deel.influenciae.benchmark.digits import train_classifier  # pylint: disable=import-outside-toplevel

    model = build_mlp(LAYER_SIZES, seed=seed)
    train_classifier(model, data["x_train"], data["y_train"], epochs, batch_size=32, learning_rate=1e-2,
                     metrics=["accuracy"])
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    return [np.asarray(weight, dtype=np.float32) for weight in model.get_weights()], float(accuracy)


def save_problem(path: Path, data: Dict[str, np.ndarray], weights: List[np.ndarray]) -> None:
    """Write the problem file read by both sides.

    Parameters
    ----------
    path
        Destination ``.npz``.
    data
        Train/test arrays.
    weights
        Model weights in ``get_weights()`` order (stored as ``weight_0``, ``weight_1``, ...).
    """
    arrays = dict(data, layer_sizes=np.asarray(LAYER_SIZES, dtype=np.int64))
    arrays.update({f"weight_{index}": weight for index, weight in enumerate(weights)})
    np.savez(path, **arrays)


def load_problem(path: Path) -> Tuple[Dict[str, np.ndarray], List[np.ndarray]]:
    """Read a problem file written by :func:`save_problem`.

    Parameters
    ----------
    path
        The ``.npz`` file.

    Returns
    -------
    tuple
        The data arrays (with ``layer_sizes``) and the list of weights.
    """
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    n_weights = sum(1 for key in arrays if key.startswith("weight_"))
    return arrays, [arrays.pop(f"weight_{index}") for index in range(n_weights)]


# -------- Measured phases (shared with reference_runner.py) ------------------------------
def peak_rss_mib() -> float:
    """Return the peak resident set size of this process so far.

    Returns
    -------
    float
        ``ru_maxrss`` in MiB (Linux reports KiB).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def collect_pairwise(nested: Any, n_test: int, n_train: int) -> np.ndarray:
    """Assemble the output of ``estimate_influence_values_in_batches`` into one matrix.

    Parameters
    ----------
    nested
        Dataset of ``((x_test, y_test), inner)``; ``inner`` yields ``((x_train, y_train), values)``
        with ``values`` of shape ``(B_test, B_train)``.
    n_test
        Expected number of test samples.
    n_train
        Expected number of training samples.

    Returns
    -------
    np.ndarray
        The ``(n_test, n_train)`` influence matrix.
    """
    rows = [np.concatenate([np.asarray(values) for _, values in inner], axis=1) for _, inner in nested]
    matrix = np.concatenate(rows, axis=0)
    if matrix.shape != (n_test, n_train):
        raise RuntimeError(f"pairwise matrix has shape {matrix.shape}, expected {(n_test, n_train)}")
    return matrix


def timed(function: Callable[[], Any]) -> Tuple[Any, float, float]:
    """Call ``function`` and measure it.

    Parameters
    ----------
    function
        A callable without arguments.

    Returns
    -------
    tuple
        Its result, its wall time in seconds (``time.perf_counter``) and the peak RSS in MiB after it.
    """
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, peak_rss_mib()


def run_phases(build: Callable[[], Tuple[Any, Any]], self_influence: Callable[[Any, Any], Any], train_ds: Any,
               test_ds: Any, shape: Tuple[int, int], repeats: int = 0) -> Tuple[Any, Dict[str, np.ndarray]]:
    """Time the three phases: Hessian, self-influence, pairwise influence; then repeat them.

    Both sides call this function (``reference_runner.py`` imports it), so they measure the same phases. The
    first pass (tracing included) gives the values, ``time_<phase>`` and the peak RSS after each phase; the
    ``repeats`` passes after it (a new IHVP and calculator each time, compiled functions already traced) give
    ``warm_<phase>``, the median of their times (NaN without repeats).

    Parameters
    ----------
    build
        Builds and returns ``(ihvp, calculator)``; the Hessian is computed there.
    self_influence
        ``(calculator, train_ds) -> values`` (N,) or (N, 1) through each side's public API: ours
        ``calculator.self_influence``, the reference's lazy ``compute_influence_values`` concatenated.
    train_ds
        Batched training ``tf.data.Dataset``.
    test_ds
        Batched test ``tf.data.Dataset``.
    shape
        ``(N_test, N_train)``.
    repeats
        Passes after the first one.

    Returns
    -------
    tuple
        The IHVP object of the first pass and a dictionary with the values, the wall times and the peak RSS.
    """
    results: Dict[str, np.ndarray] = {}
    warm_seconds: Dict[str, List[float]] = {phase: [] for phase in PHASES}
    first_ihvp = None
    for index in range(1 + repeats):
        (ihvp, calculator), *hessian_measures = timed(build)
        self_values, *self_measures = timed(lambda calc=calculator: np.asarray(self_influence(calc, train_ds)))
        pairwise, *pairwise_measures = timed(
            lambda calc=calculator: collect_pairwise(calc.estimate_influence_values_in_batches(test_ds, train_ds),
                                                     *shape))
        measures = dict(zip(PHASES, (hessian_measures, self_measures, pairwise_measures)))
        if index == 0:  # the first pass gives the values, the first-call times and the peak RSS
            first_ihvp = ihvp
            results.update(self_influence=self_values.reshape(-1), pairwise=pairwise)
            results.update({f"time_{phase}": np.array(seconds) for phase, (seconds, _) in measures.items()})
            results.update({f"rss_{phase}_mib": np.array(rss) for phase, (_, rss) in measures.items()})
        else:
            for phase, (seconds, _) in measures.items():
                warm_seconds[phase].append(seconds)
    results.update({f"warm_{phase}": np.array(np.median(times) if times else np.nan)
                    for phase, times in warm_seconds.items()})
    return first_ihvp, results
