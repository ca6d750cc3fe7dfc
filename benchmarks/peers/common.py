"""Shared pieces of the peer benchmark: problem file, parameter layouts, timing and agreement metrics.

This module imports only NumPy, so the three kinds of worker processes can use it: ours (``.venv``,
TensorFlow 2.21 + Keras 3), pyDVL and Captum (``benchmarks/.venv-peers``, PyTorch 2.13 CPU, without this
library). The data split and the training are ours only (``run_ours.py --train``, with the library's digits
builders); the torch workers read the problem file it writes.

Parameter layout
----------------
Keras stores a Dense kernel as ``(in, out)``; ``torch.nn.Linear.weight`` is ``(out, in)``. Flat
parameter vectors follow each framework's own order: ``[kernel_0, bias_0, kernel_1, bias_1, ...]``,
each flattened row-major. :func:`torch_to_keras_flat` maps a torch-ordered flat vector (or the rows
of a matrix of them) to the Keras order, so both sides' inverse-Hessian-vector products can be checked
against one Hessian.
"""
import argparse
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

LAYER_SIZES = (64, 32, 10)
N_TRAIN = 1437
N_TEST = 100
# 1,437 = 3 x 479: equal batches. pyDVL's iterative operators (CG, Arnoldi) average the batch-mean HVPs without
# weighting by batch size, which equals the sample mean only when all batches have the same size.
TRAIN_BATCH = 479
REGULARIZATION = 0.1
TOP_K = 10


def save_problem(path: Path, data: Dict[str, np.ndarray], checkpoints: List[List[np.ndarray]],
                 learning_rates: Sequence[float]) -> None:
    """Write the problem file every worker reads.

    Parameters
    ----------
    path
        Destination ``.npz``.
    data
        ``x_train`` (N, 64) float32, ``y_train`` (N,) int64 labels, ``x_test``, ``y_test``.
    checkpoints
        Keras ``get_weights()`` lists, one per checkpoint; the **last** one is the trained model used by
        the influence-function tasks.
    learning_rates
        Learning rate in use at each checkpoint (TracIn).
    """
    arrays = dict(data, layer_sizes=np.asarray(LAYER_SIZES, dtype=np.int64),
                  learning_rates=np.asarray(learning_rates, dtype=np.float64))
    for index, weights in enumerate(checkpoints):
        arrays.update({f"ckpt{index}_w{position}": weight for position, weight in enumerate(weights)})
    np.savez(path, **arrays)


def load_problem(path: Path) -> Tuple[Dict[str, np.ndarray], List[List[np.ndarray]]]:
    """Read a file written by :func:`save_problem`.

    Returns
    -------
    tuple
        The data arrays (with ``layer_sizes`` and ``learning_rates``) and the Keras weight lists of the
        checkpoints, in order.
    """
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    checkpoints: List[List[np.ndarray]] = []
    index = 0
    while f"ckpt{index}_w0" in arrays:
        count = sum(1 for key in arrays if key.startswith(f"ckpt{index}_w"))
        checkpoints.append([arrays.pop(f"ckpt{index}_w{position}") for position in range(count)])
        index += 1
    return arrays, checkpoints


def keras_to_torch_state(weights: List[np.ndarray]) -> List[np.ndarray]:
    """Keras Dense weights ``[kernel (in, out), bias, ...]`` as torch Linear ``[weight (out, in), bias, ...]``."""
    return [np.ascontiguousarray(weight.T) if weight.ndim == 2 else weight for weight in weights]


def torch_to_keras_flat(vectors: np.ndarray, layer_sizes: Sequence[int] = LAYER_SIZES) -> np.ndarray:
    """Reorder torch-flattened parameter vectors into the Keras flat order.

    Parameters
    ----------
    vectors
        Shape ``(P,)`` or ``(K, P)``, each row ``[vec(W_0 (out, in)), b_0, ...]``.
    layer_sizes
        Input width followed by the width of every Dense layer.

    Returns
    -------
    np.ndarray
        Same shape, rows ``[vec(K_0 (in, out)), b_0, ...]``.
    """
    matrix = np.atleast_2d(vectors)
    parts, offset = [], 0
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        size = fan_in * fan_out
        weight = matrix[:, offset:offset + size].reshape(-1, fan_out, fan_in)
        parts.append(np.transpose(weight, (0, 2, 1)).reshape(matrix.shape[0], size))
        parts.append(matrix[:, offset + size:offset + size + fan_out])
        offset += size + fan_out
    out = np.concatenate(parts, axis=1)
    return out[0] if np.ndim(vectors) == 1 else out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def save_results(path: Path, out: Dict[str, np.ndarray]) -> None:
    """Add the peak RSS (``rss_mib``) to a worker's arrays, write them to ``path`` (``.npz``) and say so."""
    out["rss_mib"] = np.float64(peak_rss_mib())
    np.savez(path, **out)
    print(f"  wrote {len(out)} arrays to {path}; peak RSS {float(out['rss_mib']):.0f} MiB", flush=True)


def time_repeats(function: Callable[[], Any], repeats: int) -> Tuple[Any, float, List[float]]:
    """Call ``function`` once (first call: tracing, caches) and then ``repeats`` more times.

    Returns
    -------
    tuple
        The result of the last call, the first call's seconds, and the seconds of the other calls.
    """
    start = time.perf_counter()
    result = function()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, first, times


def median(values: Sequence[float]) -> float:
    """Median, NaN for an empty sequence."""
    return float(statistics.median(values)) if len(values) else float("nan")


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.shape[0], dtype=np.float64)
    ranks[order] = np.arange(values.shape[0], dtype=np.float64)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays, flattened."""
    a64, b64 = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.corrcoef(a64, b64)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays, flattened (ties broken by position; values are continuous)."""
    return pearson(_ranks(np.ravel(a)), _ranks(np.ravel(b)))


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> float:
    """Mean over rows of ``|top_k(a_row) ∩ top_k(b_row)| / k`` (largest values; a vector is one row)."""
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    overlaps = [len(set(np.argsort(-row_a)[:k]) & set(np.argsort(-row_b)[:k])) / k for row_a, row_b in zip(a2, b2)]
    return float(np.mean(overlaps))


def agreement(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Pearson, Spearman, mean top-k overlap and ``max|a-b|/max|b|`` of two value arrays of the same shape."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"pearson": pearson(a64, b64), "spearman": spearman(a64, b64), "topk": top_k_overlap(a64, b64),
            "max_rel": float(np.max(np.abs(a64 - b64)) / max(np.max(np.abs(b64)), 1e-300))}


def summary(first: float, times: Sequence[float]) -> np.ndarray:
    """``[first call, median of the others, number of others]`` as a float array (stored in result files)."""
    return np.asarray([first, median(times), float(len(times))], dtype=np.float64)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """Options every worker takes: repeats and the solver settings of the tasks."""
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first one")
    parser.add_argument("--cg-rtol", type=float, default=1e-6, help="CG relative residual tolerance")
    parser.add_argument("--cg-maxiter", type=int, default=500, help="CG iteration cap")
    parser.add_argument("--cg-recycle", type=int, default=-1,
                        help="ours: CG search directions kept between solves (recycle_directions); -1 (default): P, "
                             "0: no recycling")
    parser.add_argument("--rank", type=int, default=50, help="Arnoldi: eigenpairs kept")
    parser.add_argument("--krylov", type=int, default=101, help="Arnoldi: Krylov subspace dimension")
