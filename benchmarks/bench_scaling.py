"""Scaling curves: time and memory of per-sample gradients, exact IF, CG, Arnoldi and TracIn as N and P grow.

Setting (no download: synthetic data and scikit-learn's bundled digits only). Inputs x in R^64 are drawn as
``mu_y + 2 eps`` with ten class means ``mu_c ~ N(0, I)``, ``eps ~ N(0, I)`` and uniform integer labels; the loss is
``SparseCategoricalCrossentropy(from_logits=True, reduction=None)``. The model is an MLP
``Input(64) -> Dense(h, relu) -> Dense(10)`` (logits) with every layer watched
(``InfluenceModel(model, start_layer=0, last_layer=-1)``): P = 75 h + 10. It is trained for 10 epochs (Adam, batch
128, learning rate ``1e-2 · min(1, sqrt(32 / h))``) on the first 2,000 samples of the (prefix-stable) training stream
whatever N, so that for a given seed the weights are the same at every N. This keeps ``H + 0.1 I`` positive definite,
which CG needs (it raises otherwise): smallest Hessian eigenvalue -0.015 at P = 985 and -0.003 at P = 2,410. With
5 epochs it was -0.22 at P = 99,985, and with a learning rate of 1e-2 at every width the P = 1M net had a Ritz value
of -0.17; CG then rightly refused. The training set of a point is the first N samples of that stream. Datasets are
``tf.data`` batches of 128; damping lambda = 0.1 everywhere.

Sweeps (``--sweeps``):

* N sweep: h = 32 (P = 2,410), N = 1k, 3k, 10k, 30k, 100k training samples, 100 test samples;
* P sweep: N = 1,000 training samples, 10 test samples, h chosen so that P ~ 1k, 3k, 10k, 100k, 1M;
* ratio table: per-sample gradients against the plain forward + backward pass on the digits MLP 64-32-10 and on a
  small CNN ``Conv2D(8, 3) -> MaxPool(2) -> Conv2D(16, 3) -> Flatten -> Dense(10)`` (padding "same", 8x8x1 digits,
  P = 3,818), both trained 5 epochs on the 1,797 digits, every layer watched, batch sizes 128 and 512; median of
  max(``--repeats``, 5) warm runs over materialised batches (the acceptance ratio), over the ``tf.data`` dataset,
  and of the library's ``batch_jacobian(dataset)`` (which also concatenates the (N, P) result).

Methods (``--methods``) of the two sweeps:

* ``psg``: per-sample gradients of all N, streamed (``batch_jacobian_tensor`` per batch, each (B, P) block dropped
  after use, so that memory does not hold N x P), and next to it the plain pass: a compiled forward + backward of
  each batch's summed loss w.r.t. the same weights over the same batches (the practical lower bound). Both run over
  the batches materialised beforehand as a list of tensors: iterating a ``tf.data`` dataset costs ~1 ms per batch
  here, as much as the whole plain pass of a small MLP batch, and would hide the ratio. Median of ``--repeats`` warm
  runs, the two interleaved;
* ``exact``: ``ExactIHVP(train, regularization=0.1)`` construction (mean Hessian + factorisation) plus the
  self-influence of all N (``FirstOrderInfluenceCalculator._compute_influence_values``). Above ``--exact-max-n``
  training samples or ``--exact-max-p`` parameters it is skipped (the factorisation is O(P^3); when the damped
  Hessian is not positive definite the library falls back to a float64 ``tf.linalg.eigh``, which alone took 117 s at
  P = 4,960 here). Where the P x P matrices exceed the library's own memory budget the library refuses by itself and the
  refusal is recorded;
* ``cg``: ``ConjugateGradientDescentIHVP(n_opt_iters=--cg-iters, tol=0, atol=0, regularization=0.1)``: with zero
  tolerances CG runs ``--cg-iters`` iterations whatever N (fewer only if the Krylov space is numerically exhausted),
  so times are comparable across sizes. Construction plus the pairwise matrix
  ``FirstOrderInfluenceCalculator.estimate_influence_values_matrix(test, train)`` (the library solves for the test
  columns: one block-CG solve of the K test vectors, each iteration one pass of mean HVPs over N). Where the solver
  exposes ``last_solve_info``, the iterations and HVP columns of the last solve are recorded, with the pairwise time
  per HVP column and training sample (block CG stops before ``--cg-iters`` once the residuals are numerically zero,
  so that is the number to compare across N);
* ``arnoldi``: ``ArnoldiInfluenceCalculator(subspace_dim=30, k_largest_eig_vals=10, force_hermitian=True,
  regularization=0.1)``: construction (30 mean HVPs + Gram-Schmidt) plus the pairwise matrix;
* ``tracin``: ``TracIn`` over 3 checkpoints (the trained model and two copies with weights perturbed by 1 % of their
  RMS, learning rate 0.01): the pairwise matrix plus the self-influence of all N.

Timing. Every point first runs a warm-up on a small dataset with the same batch shapes (one full batch and the
final partial one): the method itself for psg, exact and TracIn; for CG and Arnoldi, whose HVP loops are compiled
per instance, only the shared per-sample-gradient kernels (on that set and the test set). A stage is then timed once
("first"); when that took less than ``--second-call-s`` seconds it is run again on the same object and the second
time is the one reported (so small sizes are not dominated by tracing; CG keeps no state between solves with the
default ``recycle_directions=0``, so its second call does the same work). Stages timed once (the constructions, and
every stage above ``--second-call-s``) include the tracing of per-instance functions: a size-independent cost.

Memory. Each (size, method) runs in its own subprocess (``--isolate method``; ``--isolate point`` runs all methods
of a size in one process, faster, for smoke tests), killed above ``--max-rss-gib`` of resident memory or after
``--timeout`` seconds. Columns: ``peak`` = ``ru_maxrss`` of the subprocess (includes ~0.7 GiB of TensorFlow);
``d_import`` = that peak minus the RSS right after the imports; ``d_call`` = the peak of the timed stages (kernel
high-water mark reset before them, Linux) minus the RSS just before them: the memory the method itself needed.
``stored`` = what the current implementation keeps and grows with N: CG's pairwise path holds the (N, P)
training gradients, Arnoldi its (N, k) influence vectors and the gathered (N, 64) inputs, TracIn only the (K, sum P_k)
test gradients (it streams the training batches), all the (K, N) values; for exact, the P x P matrices of the
factorisation, constant in N. CG is skipped where its training gradients, counted twice (blocks and their
concatenation), would not fit under the RSS guard. ``load`` is the 1-minute load average at the start and the end
of the point (the machine may be shared: read high-load points with care).

Fits. ``time ~ a x^b`` by least squares on log-log, reported twice: on every point and on the points with
N >= ``--fit-min-n`` (P >= ``--fit-min-p``), where constant overheads (tracing, factorisations independent of N)
matter less. For the N sweep the memory growth is also fitted linearly (MiB per 1k samples of ``d_call``) and put
next to the stored arrays per 1k samples.

Outputs in ``--output`` (default ``benchmarks/scaling_output``): ``scaling_N.png``, ``scaling_P.png`` (log-log time,
memory), ``scaling.json`` (every number) and ``scaling.md`` (the printed tables).

Usage::

    .venv/bin/python benchmarks/bench_scaling.py --quick                 # smoke test, < 2 min
    .venv/bin/python benchmarks/bench_scaling.py                         # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_scaling.py --sweeps N --methods cg tracin --n-values 1000 10000 100000
"""
import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

# pylint cannot see the editable install's namespace package from this folder (no __init__.py here).
from deel.influenciae.common import (ConjugateGradientDescentIHVP,  # pylint: disable=no-name-in-module
                                     ExactIHVP, InfluenceModel)
from deel.influenciae.common.inverse_hessian_vector_product import (  # pylint: disable=no-name-in-module
    DEFAULT_MEMORY_BUDGET_BYTES, estimate_exact_hessian_bytes)
from deel.influenciae.influence import (ArnoldiInfluenceCalculator,  # pylint: disable=no-name-in-module
                                        FirstOrderInfluenceCalculator)
from deel.influenciae.trac_in import TracIn  # pylint: disable=no-name-in-module
from bench_common import PeakMemory, plain_step, proc_status_kib, ru_maxrss_kib  # pylint: disable=C0411

METHODS = ("psg", "exact", "cg", "arnoldi", "tracin")
SWEEPS = ("N", "P", "ratio")
DEFAULT_N_VALUES = (1000, 3000, 10000, 30000, 100000)
DEFAULT_P_VALUES = (1000, 3000, 10000, 100000, 1000000)
QUICK_N_VALUES = (500, 1000, 2000)
QUICK_P_VALUES = (1000, 3000, 10000)
INPUT_DIM = 64
NB_CLASSES = 10
N_SWEEP_HIDDEN = 32
N_SWEEP_TEST = 100
P_SWEEP_TRAIN = 1000
P_SWEEP_TEST = 10
TRAIN_SUBSET = 2000
TRAIN_EPOCHS = 10
REGULARIZATION = 0.1
ARNOLDI_SUBSPACE = 30
ARNOLDI_K = 10
TRACIN_CHECKPOINTS = 3
TRACIN_LEARNING_RATE = 0.01
TRACIN_PERTURBATION = 0.01
RATIO_BATCH_SIZES = (128, 512)
TF_OVERHEAD_BYTES = 1024 ** 3
RESULT_TAG = "@@SCALING@@ "
KIB = 1024
MIB = 1024 ** 2
GIB = 1024 ** 3


# -------- Memory probes (Linux /proc, with getrusage as the portable fallback) -----------------------------------
def ru_maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is in bytes on macOS)."""
    return ru_maxrss_kib() / KIB


def current_rss_mib() -> float:
    """Resident set size now (MiB); falls back to the peak where ``/proc`` is missing."""
    current = proc_status_kib("VmRSS")
    return current / KIB if current is not None else ru_maxrss_mib()


# -------- Timing -------------------------------------------------------------------------------------------------
def force(result: Any) -> Any:
    """Finish any pending work of an eager result (small tensors to numpy) so that the timing covers it."""
    if tf.is_tensor(result):
        return result.numpy()
    return result


def timed(function: Callable[[], Any]) -> Tuple[float, Any]:
    """Seconds taken by ``function()`` (result forced) and its result."""
    tick = time.perf_counter()
    result = force(function())
    return time.perf_counter() - tick, result


def first_then_warm(function: Callable[[], Any], second_call_s: float) -> Tuple[Dict[str, Any], Any]:
    """Time ``function`` once; when that was under ``second_call_s`` seconds, time it again and report that call.

    Returns ``({"first": s, "warm": s or None, "time": reported s}, result)``.
    """
    first, result = timed(function)
    if first >= second_call_s:
        return {"first": first, "warm": None, "time": first}, result
    result = None  # drop the first result so that it does not add to the second call's peak
    warm, result = timed(function)
    return {"first": first, "warm": warm, "time": warm}, result


# -------- Problems -----------------------------------------------------------------------------------------------
def mlp_params(hidden: int) -> int:
    """Watched parameters of ``64 -> Dense(hidden) -> Dense(10)``: ``75 hidden + 10``."""
    return (INPUT_DIM + 1) * hidden + (hidden + 1) * NB_CLASSES


def hidden_for_params(target: int) -> int:
    """Hidden width whose MLP has about ``target`` watched parameters."""
    return max(1, int(round((target - NB_CLASSES) / (INPUT_DIM + 1 + NB_CLASSES))))


def synthetic_data(n_train: int, n_test: int, seed: int) -> Tuple[Tuple[np.ndarray, ...], Tuple[np.ndarray, ...]]:
    """Gaussian classes in R^64 with integer labels; the first rows do not depend on ``n_train`` (prefix-stable)."""
    means = np.random.default_rng([seed, 0]).standard_normal((NB_CLASSES, INPUT_DIM)).astype(np.float32)

    def draw(size: int, stream: int) -> Tuple[np.ndarray, np.ndarray]:
        labels = np.random.default_rng([seed, stream, 1]).integers(0, NB_CLASSES, size)
        noise = np.random.default_rng([seed, stream, 2]).standard_normal((size, INPUT_DIM)).astype(np.float32)
        return (means[labels] + 2.0 * noise).astype(np.float32), labels.astype(np.int32)

    return draw(n_train, 1), draw(n_test, 2)


def digits_data() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (offline): inputs (1797, 64) in [0, 1], integer labels."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def per_sample_loss() -> keras.losses.Loss:
    """The un-reduced loss every benchmark uses."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def build_mlp(hidden: int, seed: int) -> keras.Model:
    """``Input(64) -> Dense(hidden, relu) -> Dense(10)`` (logits), seeded initialisation."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((INPUT_DIM,)), keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(NB_CLASSES)])


def build_cnn(seed: int) -> keras.Model:
    """``Conv2D(8, 3) -> MaxPool(2) -> Conv2D(16, 3) -> Flatten -> Dense(10)`` on 8x8x1 images (P = 3,818)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)),
                             keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                             keras.layers.MaxPooling2D(2),
                             keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                             keras.layers.Flatten(),
                             keras.layers.Dense(NB_CLASSES)])


def learning_rate(hidden: int) -> float:
    """Adam learning rate ``1e-2 · min(1, sqrt(32 / hidden))``: wide layers trained at 1e-2 end in sharp regions
    where ``H + 0.1 I`` is indefinite (smallest Ritz value -0.17 at P = 1M after 10 epochs)."""
    return 1e-2 * min(1.0, math.sqrt(N_SWEEP_HIDDEN / hidden))


def train(model: keras.Model, inputs: np.ndarray, labels: np.ndarray, epochs: int, rate: float = 1e-2
          ) -> keras.Model:
    """A short, seeded training with Adam so that the Hessian is that of a (partly) fitted model."""
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, labels, epochs=epochs, batch_size=128, verbose=0, shuffle=False)
    return model


def batched(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """A batched ``tf.data`` dataset of ``(x, y)``."""
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)


def warm_size(n_samples: int, batch_size: int) -> int:
    """Samples of the warm-up set: one full batch plus the final partial batch of the real set (same shapes)."""
    return min(n_samples, batch_size + n_samples % batch_size)


class Problem:
    """Data, model and datasets of one measurement point of a sweep."""

    def __init__(self, hidden: int, n_train: int, n_test: int, batch_size: int, seed: int):
        (x_train, y_train), (x_test, y_test) = synthetic_data(max(n_train, TRAIN_SUBSET), n_test, seed)
        self.model = train(build_mlp(hidden, seed), x_train[:TRAIN_SUBSET], y_train[:TRAIN_SUBSET], TRAIN_EPOCHS,
                           learning_rate(hidden))
        x_train, y_train = x_train[:n_train], y_train[:n_train]
        self.loss_function = per_sample_loss()
        self.influence_model = InfluenceModel(self.model, start_layer=0, last_layer=-1,
                                              loss_function=self.loss_function)
        self.train_ds = batched(x_train, y_train, batch_size)
        self.test_ds = batched(x_test, y_test, batch_size)
        warm = warm_size(n_train, batch_size)
        self.warm_ds = batched(x_train[:warm], y_train[:warm], batch_size)
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.n_params = int(self.influence_model.nb_params)

    def checkpoints(self) -> List[InfluenceModel]:
        """TracIn checkpoints: the trained model and copies whose weights are perturbed by 1 % of their RMS."""
        models = [self.influence_model]
        weights = self.model.get_weights()
        for index in range(1, TRACIN_CHECKPOINTS):
            rng = np.random.default_rng([self.seed, 100 + index])
            copy = keras.models.clone_model(self.model)
            copy.set_weights([w + TRACIN_PERTURBATION * max(float(np.sqrt(np.mean(w ** 2))), 1e-3)
                              * rng.standard_normal(w.shape).astype(w.dtype) for w in weights])
            models.append(InfluenceModel(copy, start_layer=0, last_layer=-1, loss_function=self.loss_function))
        return models


# -------- The two gradient passes --------------------------------------------------------------------------------
Batches = Iterable[Tuple[tf.Tensor, ...]]


def materialize(dataset: tf.data.Dataset) -> List[Tuple[tf.Tensor, ...]]:
    """The batches of a dataset as a list of tensor tuples, so that timings leave out the tf.data iteration."""
    return [tuple(batch) for batch in dataset]


def streamed_jacobians(influence_model: InfluenceModel, batches: Batches) -> Callable[[], float]:
    """Per-sample gradients of every batch, each (B, P) block dropped after use; returns the last entry."""

    def run() -> float:
        block = None
        for batch in batches:
            block = influence_model.batch_jacobian_tensor(tuple(batch))
        return float(block[-1, -1]) if block is not None else 0.0

    return run


def plain_pass(step: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], batches: Batches) -> Callable[[], float]:
    """The plain ``step`` over every batch; returns the last entry of the last gradient."""

    def run() -> float:
        last = None
        for batch in batches:
            last = step(*tuple(batch)[:2])
        return float(last[-1]) if last is not None else 0.0

    return run


def interleaved_medians(functions: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, the functions alternating within each round."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(timed(function)[0])
    return {name: statistics.median(values) for name, values in times.items()}


# -------- Methods (worker side) ----------------------------------------------------------------------------------
def self_influence(calculator: Any, dataset: tf.data.Dataset) -> tf.Tensor:
    """Self-influence of every sample as one (N, 1) tensor: the calculators' eager path (the public
    ``compute_influence_values`` returns a lazy dataset)."""
    return calculator._compute_influence_values(dataset)  # pylint: disable=protected-access


def method_psg(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Streamed per-sample gradients against the plain forward + backward pass (median of warm repeats)."""
    step = plain_step(problem.model, problem.loss_function)
    batches, warm_batches = materialize(problem.train_ds), materialize(problem.warm_ds)
    streamed = streamed_jacobians(problem.influence_model, batches)
    plain = plain_pass(step, batches)
    warmup, _ = timed(lambda: (streamed_jacobians(problem.influence_model, warm_batches)(),
                               plain_pass(step, warm_batches)()))
    with PeakMemory() as memory:
        medians = interleaved_medians({"psg": streamed, "fwd+bwd": plain}, spec["repeats"])
    ratio = medians["psg"] / medians["fwd+bwd"]
    return {"times": medians, "time_s": medians["psg"], "first_s": None, "warmup_s": warmup,
            "d_call_mib": memory.delta_mib, "stored_bytes": 0, "ratio": ratio, "note": f"{ratio:.2f}x fwd+bwd"}


def method_exact(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """ExactIHVP construction + self-influence of all N."""
    im, train_ds = problem.influence_model, problem.train_ds
    try:
        warm_ihvp = ExactIHVP(im, problem.warm_ds, regularization=REGULARIZATION)
    except ValueError as error:
        if "would need" not in str(error):
            raise
        return {"status": "skipped", "note": f"library refused: {str(error).split(' Use ', maxsplit=1)[0]}"}
    warmup, _ = timed(lambda: self_influence(FirstOrderInfluenceCalculator(im, problem.warm_ds,
                                                                           ihvp_calculator=warm_ihvp),
                                             problem.warm_ds))
    with PeakMemory() as memory:
        build, ihvp = first_then_warm(lambda: ExactIHVP(im, train_ds, regularization=REGULARIZATION),
                                      spec["second_call_s"])
        calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator=ihvp)
        values, _ = first_then_warm(lambda: self_influence(calculator, train_ds), spec["second_call_s"])
    factorisation = "eigh" if getattr(ihvp, "_eigenvalues", None) is not None else "Cholesky"
    return {"times": {"build": build["time"], "self": values["time"]}, "time_s": build["time"] + values["time"],
            "first_s": build["first"] + values["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": estimate_exact_hessian_bytes(problem.n_params) + 4 * problem.n_train,
            "note": f"build {build['time']:.2f} s ({factorisation}) + self {values['time']:.2f} s"}


def warm_gradient_kernels(problem: Problem) -> None:
    """Trace the shared per-sample-gradient kernels on every batch shape of the training and test sets.

    CG and Arnoldi compile their Hessian-vector-product loops per instance, so a warm-up instance would not help
    them; a CG warm-up on the small set could even fail where the mean Hessian of a few samples is not positive
    definite after damping.
    """
    problem.influence_model.batch_jacobian(problem.warm_ds)
    problem.influence_model.batch_jacobian(problem.test_ds)


def cg_calculator(problem: Problem, dataset: tf.data.Dataset, iterations: int) -> FirstOrderInfluenceCalculator:
    """First-order calculator on CG with zero tolerances: exactly ``iterations`` CG iterations per solve."""
    ihvp = ConjugateGradientDescentIHVP(problem.influence_model, train_dataset=dataset, n_opt_iters=iterations,
                                        regularization=REGULARIZATION, tol=0.0, atol=0.0)
    return FirstOrderInfluenceCalculator(problem.influence_model, dataset, ihvp_calculator=ihvp)


def stored_guard(stored_bytes: int, spec: Dict[str, Any], what: str) -> Optional[str]:
    """A skip reason when twice ``stored_bytes`` plus TensorFlow's own memory would pass the RSS guard, else None.

    Twice: the per-batch blocks and their concatenation are alive together (measured: CG's pairwise path at
    N = 1,000, P = 1M peaked 6.3 GiB above its start for 3.7 GiB of training gradients).
    """
    if 2 * stored_bytes + TF_OVERHEAD_BYTES <= spec["max_rss_bytes"]:
        return None
    return (f"{what} would need {stored_bytes / GIB:.1f} GiB, twice while concatenated (guard "
            f"{spec['max_rss_bytes'] / GIB:.1f} GiB incl. ~1 GiB of TensorFlow)")


def method_cg(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """CG construction + pairwise matrix (test x train)."""
    # Training gradients are streamed batch by batch (the test side is solved); what stays is the cached model
    # inputs of the Hessian samples, the (N_test, N) result and the (N_test, P) test gradients and solutions.
    stored = 4 * (problem.n_train * (INPUT_DIM + problem.n_test) + 2 * problem.n_test * problem.n_params)
    reason = stored_guard(stored, spec, "the cached inputs and the pairwise matrix")
    if reason:
        return {"status": "skipped", "note": reason, "stored_bytes": stored}
    iterations = spec["cg_iters"]
    warmup, _ = timed(lambda: warm_gradient_kernels(problem))
    with PeakMemory() as memory:
        build, calculator = timed(lambda: cg_calculator(problem, problem.train_ds, iterations))
        pairs, _ = first_then_warm(lambda: calculator.estimate_influence_values_matrix(problem.test_ds,
                                                                                       problem.train_ds),
                                   spec["second_call_s"])
    info = getattr(calculator.ihvp_calculator, "last_solve_info", None) or {}
    solve = {key: int(info[key]) for key in ("iterations", "operator_columns") if key in info}
    done = f"max {iterations} iterations"
    if len(solve) == 2 and solve["operator_columns"]:
        per_column = 1e9 * pairs["time"] / (solve["operator_columns"] * problem.n_train)
        done = (f"{solve['iterations']} iterations, {solve['operator_columns']} HVP columns, "
                f"{per_column:.1f} ns per column and sample")
    return {"times": {"build": build, "pairwise": pairs["time"]}, "time_s": build + pairs["time"],
            "first_s": build + pairs["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "solve": solve,
            "note": f"{problem.n_test} test vectors, {done}; pairwise {pairs['time']:.2f} s"}


def arnoldi_calculator(problem: Problem, dataset: tf.data.Dataset) -> ArnoldiInfluenceCalculator:
    """Arnoldi calculator with the benchmark's settings."""
    return ArnoldiInfluenceCalculator(problem.influence_model, dataset, subspace_dim=ARNOLDI_SUBSPACE,
                                      force_hermitian=True, k_largest_eig_vals=ARNOLDI_K,
                                      regularization=REGULARIZATION, seed=problem.seed)


def method_arnoldi(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Arnoldi construction + pairwise matrix (test x train)."""
    if problem.n_params < ARNOLDI_SUBSPACE:
        return {"status": "skipped", "note": f"P < subspace_dim={ARNOLDI_SUBSPACE}"}
    stored = 4 * problem.n_train * (ARNOLDI_K + problem.n_test + INPUT_DIM + 1)
    warmup, _ = timed(lambda: warm_gradient_kernels(problem))
    with PeakMemory() as memory:
        build, calculator = timed(lambda: arnoldi_calculator(problem, problem.train_ds))
        pairs, _ = first_then_warm(lambda: calculator.estimate_influence_values_matrix(problem.test_ds,
                                                                                       problem.train_ds),
                                   spec["second_call_s"])
    return {"times": {"build": build, "pairwise": pairs["time"]}, "time_s": build + pairs["time"],
            "first_s": build + pairs["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "note": f"build {build:.2f} s + pairwise {pairs['time']:.2f} s"}


def method_tracin(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """TracIn (3 checkpoints): pairwise matrix + self-influence of all N."""
    tracin = TracIn(problem.checkpoints(), TRACIN_LEARNING_RATE)
    stored = 4 * problem.n_test * (int(tracin.nb_params) + problem.n_train)
    warmup, _ = timed(lambda: (self_influence(tracin, problem.warm_ds),
                               tracin.estimate_influence_values_matrix(problem.test_ds, problem.warm_ds)))
    with PeakMemory() as memory:
        values, _ = first_then_warm(lambda: self_influence(tracin, problem.train_ds), spec["second_call_s"])
        pairs, _ = first_then_warm(lambda: tracin.estimate_influence_values_matrix(problem.test_ds,
                                                                                   problem.train_ds),
                                   spec["second_call_s"])
    return {"times": {"pairwise": pairs["time"], "self": values["time"]}, "time_s": pairs["time"] + values["time"],
            "first_s": pairs["first"] + values["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "note": f"pairwise {pairs['time']:.2f} s + self {values['time']:.2f} s"}


METHOD_FUNCTIONS = {"psg": method_psg, "exact": method_exact, "cg": method_cg, "arnoldi": method_arnoldi,
                    "tracin": method_tracin}


def exact_skip_reason(n_train: int, n_params: int, exact_max_n: int, exact_max_p: int) -> Optional[str]:
    """Why ``exact`` is not run at this size (None: run it). Sizes the library refuses are run to record that."""
    if estimate_exact_hessian_bytes(n_params) > DEFAULT_MEMORY_BUDGET_BYTES:
        return None
    if n_params > exact_max_p:
        return (f"P={n_params} above --exact-max-p={exact_max_p} (O(P^3) float64 factorisation; "
                "tf.linalg.eigh fallback takes minutes here)")
    if n_train > exact_max_n:
        return f"N={n_train} above --exact-max-n={exact_max_n}"
    return None


def emit(record: Dict[str, Any]) -> None:
    """Send one result line to the driver."""
    print(RESULT_TAG + json.dumps(record), flush=True)


def worker_sweep(spec: Dict[str, Any], rss_import_mib: float) -> None:
    """Run the methods of one sweep point and emit one record per method."""
    problem = Problem(spec["hidden"], spec["n"], spec["n_test"], spec["batch_size"], spec["seed"])
    for method in spec["methods"]:
        record = {"sweep": spec["sweep"], "method": method, "n": spec["n"], "p": problem.n_params,
                  "n_test": spec["n_test"], "status": "ok", "load_start": os.getloadavg()[0]}
        reason = exact_skip_reason(spec["n"], problem.n_params, spec["exact_max_n"], spec["exact_max_p"]) \
            if method == "exact" else None
        if reason:
            record.update(status="skipped", note=reason)
        else:
            record["rss_before_mib"] = current_rss_mib()
            try:
                record.update(METHOD_FUNCTIONS[method](problem, spec))
            except Exception as error:  # pylint: disable=broad-exception-caught
                # Keep measuring the other methods of this size; the error is part of the results.
                record.update(status="error", note=f"{type(error).__name__}: {str(error)[:300]}")
        record.update(peak_mib=ru_maxrss_mib(), d_import_mib=ru_maxrss_mib() - rss_import_mib,
                      load_end=os.getloadavg()[0])
        emit(record)


def ratio_functions(influence_model: InfluenceModel, step: Callable, dataset: tf.data.Dataset
                    ) -> Dict[str, Callable[[], Any]]:
    """The passes compared in the ratio table: over pre-materialised batches, over the dataset, and the library's
    ``batch_jacobian(dataset)`` (which also concatenates the (N, P) result)."""
    batches = materialize(dataset)
    return {"psg": streamed_jacobians(influence_model, batches), "fwd+bwd": plain_pass(step, batches),
            "psg tf.data": streamed_jacobians(influence_model, dataset), "fwd+bwd tf.data": plain_pass(step, dataset),
            "batch_jacobian(ds)": lambda: influence_model.batch_jacobian(dataset)}


def worker_ratio(spec: Dict[str, Any]) -> None:
    """Per-sample gradients vs the plain pass on the digits MLP and CNN, at each batch size; one record per row."""
    inputs, labels = digits_data()
    for name in spec["models"]:
        model = build_mlp(N_SWEEP_HIDDEN, spec["seed"]) if name == "mlp" else build_cnn(spec["seed"])
        data = inputs if name == "mlp" else inputs.reshape(-1, 8, 8, 1)
        train(model, data, labels, 5)
        influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=per_sample_loss())
        step = plain_step(model, influence_model.loss_function)
        for batch_size in spec["batch_sizes"]:
            functions = ratio_functions(influence_model, step, batched(data, labels, batch_size))
            for function in functions.values():  # warm-up: traces every batch shape
                timed(function)
            medians = interleaved_medians(functions, spec["repeats"])
            emit({"sweep": "ratio", "model": name, "batch_size": batch_size, "n": len(labels),
                  "p": int(influence_model.nb_params), "times": medians, "status": "ok",
                  "ratio": medians["psg"] / medians["fwd+bwd"],
                  "ratio_tf_data": medians["psg tf.data"] / medians["fwd+bwd tf.data"],
                  "ratio_batch_jacobian": medians["batch_jacobian(ds)"] / medians["fwd+bwd tf.data"]})


def worker_main(spec_json: str) -> int:
    """Entry point of a measurement subprocess."""
    rss_import_mib = current_rss_mib()
    spec = json.loads(spec_json)
    keras.utils.set_random_seed(spec["seed"])
    if spec["sweep"] == "ratio":
        worker_ratio(spec)
    else:
        worker_sweep(spec, rss_import_mib)
    return 0


# -------- Driver -------------------------------------------------------------------------------------------------
def kill_group(process: subprocess.Popen) -> None:
    """Kill the measurement subprocess we started (it leads its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


def last_error_line(text: str) -> str:
    """The most informative line of a worker's stderr (the last Python error line, else the last line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


def run_worker(spec: Dict[str, Any], timeout_s: float, max_rss_bytes: int) -> Tuple[List[Dict[str, Any]], str]:
    """Run one subprocess; return its records and, if it did not finish cleanly, why."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=environment,  # pylint: disable=R1732
                                   start_new_session=True)
        start, failure, rss_seen = time.monotonic(), "", 0
        while process.poll() is None:
            rss_kib = proc_status_kib("VmRSS", str(process.pid)) or 0
            rss_seen = max(rss_seen, rss_kib)
            if rss_kib * KIB > max_rss_bytes:
                kill_group(process)
                failure = f"rss-guard: killed at {rss_kib / KIB / KIB:.1f} GiB resident"
            elif time.monotonic() - start > timeout_s:
                kill_group(process)
                failure = f"timeout: killed after {timeout_s:.0f} s"
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        records = [json.loads(line[len(RESULT_TAG):]) for line in out if line.startswith(RESULT_TAG)]
        if not failure and process.returncode != 0:
            failure = f"error (exit {process.returncode}): {last_error_line(err.read())}"
    for record in records:
        record["driver_rss_seen_mib"] = rss_seen / KIB
    return records, failure


def sweep_specs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The subprocess specifications of the N and P sweeps."""
    common = {"batch_size": args.batch_size, "seed": args.seed, "cg_iters": args.cg_iters, "repeats": args.repeats,
              "second_call_s": args.second_call_s, "max_rss_bytes": int(args.max_rss_gib * GIB),
              "exact_max_n": args.exact_max_n, "exact_max_p": args.exact_max_p}
    points = []
    if "N" in args.sweeps:
        points += [dict(common, sweep="N", n=n, hidden=N_SWEEP_HIDDEN, n_test=N_SWEEP_TEST) for n in args.n_values]
    if "P" in args.sweeps:
        points += [dict(common, sweep="P", n=P_SWEEP_TRAIN, hidden=hidden_for_params(p), n_test=P_SWEEP_TEST)
                   for p in args.p_values]
    specs = []
    for point in points:
        methods = list(args.methods)
        if args.isolate == "point":
            specs.append(dict(point, methods=methods))
        else:
            specs += [dict(point, methods=[method]) for method in methods]
    return specs


def describe(record: Dict[str, Any]) -> str:
    """One progress line for a record."""
    where = f"[{record['sweep']}] N={record['n']:>7,} P={record.get('p', 0):>9,} {record['method']:<8}"
    if record.get("time_s") is not None:
        return (f"{where} {record['time_s']:9.3f} s  d_call {record.get('d_call_mib', 0):8.1f} MiB  "
                f"peak {record.get('peak_mib', 0):8.1f} MiB  {record.get('note', '')}")
    return f"{where} {record['status']}: {record.get('note', '')}"


def run_sweeps(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Run every sweep point (one subprocess each) and return all records."""
    records: List[Dict[str, Any]] = []
    for spec in sweep_specs(args):
        p_value = mlp_params(spec["hidden"])
        if spec["methods"] == ["exact"]:
            reason = exact_skip_reason(spec["n"], p_value, args.exact_max_n, args.exact_max_p)
            if reason:  # do not pay a subprocess start to skip
                record = {"sweep": spec["sweep"], "method": "exact", "n": spec["n"], "p": p_value,
                          "n_test": spec["n_test"], "status": "skipped", "note": reason}
                records.append(record)
                print(describe(record), flush=True)
                continue
        got, failure = run_worker(spec, args.timeout, int(args.max_rss_gib * GIB))
        done = {record["method"] for record in got}
        for method in spec["methods"]:
            if method not in done:
                status = failure.split(":", maxsplit=1)[0] if failure else "error"
                got.append({"sweep": spec["sweep"], "method": method, "n": spec["n"], "p": p_value,
                            "n_test": spec["n_test"], "status": status, "note": failure or "no record"})
        for record in got:
            print(describe(record), flush=True)
        records += got
    return records


# -------- Analysis and report ------------------------------------------------------------------------------------
def power_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[Dict[str, float]]:
    """Least-squares fit of ``log y = log a + b log x``; None with fewer than two usable points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0 and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    log_x, log_y = np.log([x for x, _ in pairs]), np.log([y for _, y in pairs])
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    return {"exponent": float(exponent), "prefactor": float(np.exp(intercept)), "points": len(pairs),
            "x_min": float(min(x for x, _ in pairs)), "x_max": float(max(x for x, _ in pairs))}


CURVE_COLORS = {"psg": "tab:blue", "fwd+bwd": "tab:gray", "exact": "tab:green", "cg": "tab:red",
                "arnoldi": "tab:purple", "tracin": "tab:brown"}


def series(records: List[Dict[str, Any]], sweep: str) -> Dict[str, List[Tuple[int, float, float, float]]]:
    """``{curve: [(x, seconds, d_call MiB, stored MiB)]}`` for one sweep; x is N or P; fwd+bwd comes from the psg
    records (no memory of its own)."""
    axis = "n" if sweep == "N" else "p"
    curves: Dict[str, List[Tuple[int, float, float, float]]] = {}
    for record in records:
        if record.get("sweep") != sweep or record.get("time_s") is None:
            continue
        curves.setdefault(record["method"], []).append((record[axis], record["time_s"], record["d_call_mib"],
                                                        record.get("stored_bytes", 0) / MIB))
        if record["method"] == "psg":
            curves.setdefault("fwd+bwd", []).append((record[axis], record["times"]["fwd+bwd"], float("nan"),
                                                     float("nan")))
    return {name: sorted(points) for name, points in curves.items()}


def sweep_fits(records: List[Dict[str, Any]], sweep: str, fit_min: int) -> Dict[str, Dict[str, Any]]:
    """Power-law fits of time for every curve: on all points and on x >= ``fit_min``."""
    fits = {}
    for name, points in series(records, sweep).items():
        xs, ys = [point[0] for point in points], [point[1] for point in points]
        large = [(x, t) for x, t in zip(xs, ys) if x >= fit_min]
        fits[name] = {"all": power_fit(xs, ys),
                      "large": power_fit([x for x, _ in large], [t for _, t in large])}
    return fits


def memory_growth(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Linear fit of the N sweep's ``d_call`` (MiB per 1k samples) next to the stored arrays per 1k samples."""
    growth = {}
    for method in METHODS:
        points = [(r["n"], r["d_call_mib"], r.get("stored_bytes", 0)) for r in records
                  if r.get("sweep") == "N" and r.get("method") == method and r.get("time_s") is not None]
        if len(points) < 2:
            continue
        slope = np.polyfit([n for n, _, _ in points], [m for _, m, _ in points], 1)[0]
        largest = max(points)
        growth[method] = {"mib_per_1k": float(slope * 1000),
                          "stored_mib_per_1k": float(largest[2] / largest[0] * 1000 / MIB) if method != "exact"
                          else 0.0}
    return growth


def format_fit(fit: Optional[Dict[str, float]]) -> str:
    """``b (n pts, x_min..x_max)`` or a dash."""
    if not fit:
        return "-"
    return f"{fit['exponent']:.2f} ({fit['points']} pts, {fit['x_min']:,.0f}..{fit['x_max']:,.0f})"


def sweep_table(records: List[Dict[str, Any]], sweep: str) -> List[str]:
    """Markdown table of one sweep's records."""
    lines = ["| method | N | P | time (s) | first (s) | warm-up (s) | peak (MiB) | d_import (MiB) | d_call (MiB) "
             "| stored (MiB) | load | status / note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    chosen = [r for r in records if r.get("sweep") == sweep]
    chosen.sort(key=lambda r: (METHODS.index(r["method"]), r["n"], r.get("p", 0)))

    def number(value: Any, digits: int) -> str:
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
            else f"{value:,.{digits}f}"

    for r in chosen:
        note = r.get("note", "") if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        stored = r.get("stored_bytes")
        load = f"{r['load_start']:.1f}→{r['load_end']:.1f}" if "load_end" in r else "-"
        lines.append(f"| {r['method']} | {r['n']:,} | {r.get('p', 0):,} | {number(r.get('time_s'), 3)} "
                     f"| {number(r.get('first_s'), 3)} | {number(r.get('warmup_s'), 2)} "
                     f"| {number(r.get('peak_mib'), 0)} | {number(r.get('d_import_mib'), 0)} "
                     f"| {number(r.get('d_call_mib'), 1)} | {number(None if stored is None else stored / MIB, 1)} "
                     f"| {load} | {note.replace('|', '/')} |")
    return lines


def fits_table(fits: Dict[str, Dict[str, Any]], variable: str, fit_min: int) -> List[str]:
    """Markdown table of the fitted exponents of one sweep."""
    lines = [f"| curve | exponent b of time ~ {variable}^b, all points | b on {variable} >= {fit_min:,} |",
             "|---|---|---|"]
    for name, fit in fits.items():
        lines.append(f"| {name} | {format_fit(fit['all'])} | {format_fit(fit['large'])} |")
    return lines


def ratio_table(records: List[Dict[str, Any]]) -> List[str]:
    """Markdown table of the per-sample-gradient / plain-pass ratios."""
    lines = ["| model | P | batch | psg (ms) | fwd+bwd (ms) | ratio | psg, tf.data (ms) | fwd+bwd, tf.data (ms) "
             "| ratio, tf.data | batch_jacobian(ds) (ms) | ratio | within 3x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if r.get("sweep") != "ratio":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r.get('model', '?')} | | | | | | | | | | | {r['status']}: {r.get('note', '')} |")
            continue
        ms = {name: f"{1e3 * value:.1f}" for name, value in r["times"].items()}
        lines.append(f"| {r['model']} (N={r['n']:,}) | {r['p']:,} | {r['batch_size']} | {ms['psg']} "
                     f"| {ms['fwd+bwd']} | {r['ratio']:.2f} | {ms['psg tf.data']} | {ms['fwd+bwd tf.data']} "
                     f"| {r['ratio_tf_data']:.2f} | {ms['batch_jacobian(ds)']} | {r['ratio_batch_jacobian']:.2f} "
                     f"| {'yes' if r['ratio'] <= 3 else 'NO'} |")
    return lines


def plot_sweep(records: List[Dict[str, Any]], sweep: str, path: str) -> bool:
    """Log-log time and memory curves of one sweep into ``path``; False when there is nothing to plot."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    curves = series(records, sweep)
    if not curves:
        return False
    label = "N (training samples)" if sweep == "N" else "P (watched parameters)"
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in curves.items():
        color = CURVE_COLORS.get(name)
        time_axis.loglog([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=name)
        memory = [p for p in points if math.isfinite(p[2])]
        if memory:
            memory_axis.plot([p[0] for p in memory], [p[2] for p in memory], marker="o", color=color,
                             label=f"{name}: peak growth")
            if any(p[3] > 0 for p in memory):
                memory_axis.plot([p[0] for p in memory], [p[3] for p in memory], linestyle=":", color=color,
                                 label=f"{name}: stored by design")
    all_x = sorted({p[0] for points in curves.values() for p in points})
    if len(all_x) > 1:
        reference = curves.get("cg") or next(iter(curves.values()))
        time_axis.loglog(all_x, [reference[0][1] * x / reference[0][0] for x in all_x], "k--", alpha=0.4,
                         label=f"∝ {sweep}")
    memory_axis.set_xscale("log")
    memory_axis.set_yscale("symlog", linthresh=1.0)
    memory_axis.set_ylim(bottom=0.0)
    time_axis.set(xlabel=label, ylabel="seconds", title=f"Time vs {sweep}")
    memory_axis.set(xlabel=label, ylabel="MiB (symlog)", title=f"Memory of the timed stages vs {sweep}")
    for axis in (time_axis, memory_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def report(records: List[Dict[str, Any]], args: argparse.Namespace) -> Tuple[List[str], Dict[str, Any]]:
    """Tables (markdown lines) and the fits of every sweep."""
    lines: List[str] = []
    fits: Dict[str, Any] = {}
    settings = (f"λ = {REGULARIZATION}; CG: {args.cg_iters} iterations (tol = atol = 0); Arnoldi: subspace "
                f"{ARNOLDI_SUBSPACE}, k = {ARNOLDI_K}; TracIn: {TRACIN_CHECKPOINTS} checkpoints; batch "
                f"{args.batch_size}")
    for sweep, variable, fit_min, title in (("N", "N", args.fit_min_n, f"N sweep (MLP 64-{N_SWEEP_HIDDEN}-10, "
                                                                      f"P = {mlp_params(N_SWEEP_HIDDEN):,}, "
                                                                      f"{N_SWEEP_TEST} test samples)"),
                                            ("P", "P", args.fit_min_p, f"P sweep (MLP 64-h-10, N = {P_SWEEP_TRAIN:,}, "
                                                                      f"{P_SWEEP_TEST} test samples)")):
        if not any(r.get("sweep") == sweep for r in records):
            continue
        fits[sweep] = sweep_fits(records, sweep, fit_min)
        lines += [f"## {title}", "", settings, ""] + sweep_table(records, sweep) + [""]
        lines += [f"### Fitted exponents ({sweep} sweep)", ""] + fits_table(fits[sweep], variable, fit_min) + [""]
    if any(r.get("sweep") == "N" for r in records):
        fits["memory_N"] = memory_growth(records)
        lines += ["### Memory growth with N (linear fit of d_call)", "",
                  "| method | d_call growth (MiB per 1k samples) | stored by design (MiB per 1k samples) |",
                  "|---|---:|---:|"]
        lines += [f"| {name} | {value['mib_per_1k']:.2f} | {value['stored_mib_per_1k']:.2f} |"
                  for name, value in fits["memory_N"].items()] + [""]
    if any(r.get("sweep") == "ratio" for r in records):
        lines += ["## Per-sample gradients / plain forward+backward (digits, every layer watched, median of "
                  f"{max(args.repeats, 5)} warm runs)", ""] + ratio_table(records) + [""]
    return lines, fits


# -------- Command line -------------------------------------------------------------------------------------------
def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and complete the command line (``--quick`` fills in small defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweeps, one process per size (< 2 min)")
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="parts to run")
    parser.add_argument("--n-values", nargs="+", type=int, help="N sweep sizes (default 1k 3k 10k 30k 100k)")
    parser.add_argument("--p-values", nargs="+", type=int, help="P sweep targets (default 1k 3k 10k 100k 1M)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="sweep methods")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess (default 600)")
    parser.add_argument("--max-rss-gib", type=float, help="kill a subprocess above this RSS (default 50%% of RAM)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "scaling_output"), help="folder of the PNG/JSON/MD files")
    parser.add_argument("--isolate", choices=("method", "point"), help="one subprocess per (size, method) or "
                        "per size (default: method; point with --quick)")
    parser.add_argument("--repeats", type=int, help="warm repeats of the gradient passes (default 3; 2 quick)")
    parser.add_argument("--second-call-s", type=float, default=30.0,
                        help="time a stage a second (warm) time when its first call took less (default 30 s)")
    parser.add_argument("--cg-iters", type=int, default=20, help="CG iterations, all run (default 20)")
    parser.add_argument("--exact-max-n", type=int, default=100000, help="largest N for exact (default 100,000)")
    parser.add_argument("--exact-max-p", type=int, default=5000, help="largest P for exact (default 5,000)")
    parser.add_argument("--fit-min-n", type=int, default=3000, help="second fit on N >= this (default 3,000)")
    parser.add_argument("--fit-min-p", type=int, default=9000,
                        help="second fit on P >= this (default 9,000: the 10k target is P = 9,985)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the sweeps (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.n_values = args.n_values or list(QUICK_N_VALUES if args.quick else DEFAULT_N_VALUES)
    args.p_values = args.p_values or list(QUICK_P_VALUES if args.quick else DEFAULT_P_VALUES)
    args.isolate = args.isolate or ("point" if args.quick else "method")
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.max_rss_gib is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * GIB
        args.max_rss_gib = 0.5 * total / GIB
    if min(args.n_values + args.p_values) < 1 or args.repeats < 1 or args.cg_iters < 1 or args.batch_size < 1:
        parser.error("sizes, --repeats, --cg-iters and --batch-size must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point: the driver, or a measurement subprocess with ``--worker``."""
    args = parse_arguments(argv)
    if args.worker:
        return worker_main(args.worker)
    wall_start = time.perf_counter()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min) at start; RSS guard "
          f"{args.max_rss_gib:.1f} GiB, timeout {args.timeout:.0f} s per subprocess, isolation: {args.isolate}\n",
          flush=True)
    records = run_sweeps(args) if {"N", "P"} & set(args.sweeps) else []
    if "ratio" in args.sweeps:
        spec = {"sweep": "ratio", "models": ["mlp", "cnn"], "batch_sizes": list(RATIO_BATCH_SIZES),
                "repeats": max(args.repeats, 5), "seed": args.seed}  # cheap: more repeats, steadier ratios
        got, failure = run_worker(spec, args.timeout, int(args.max_rss_gib * GIB))
        if failure:
            got.append({"sweep": "ratio", "model": "mlp+cnn", "status": failure.split(":", maxsplit=1)[0],
                        "note": failure})
        records += got
    lines, fits = report(records, args)
    wall = time.perf_counter() - wall_start
    lines.append(f"Wall time {wall:.0f} s; load average {os.getloadavg()[0]:.2f} (1 min) at the end.")
    print("\n" + "\n".join(lines))
    os.makedirs(args.output, exist_ok=True)
    for sweep in ("N", "P"):
        path = os.path.join(args.output, f"scaling_{sweep}.png")
        if plot_sweep(records, sweep, path):
            print(f"wrote {path}")
    with open(os.path.join(args.output, "scaling.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    settings = {key: value for key, value in vars(args).items() if key != "worker"}
    with open(os.path.join(args.output, "scaling.json"), "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "environment": {"tensorflow": tf.__version__, "keras": keras.__version__,
                                                         "python": platform.python_version(),
                                                         "cpus": os.cpu_count()},
                   "records": records, "fits": fits, "wall_s": wall}, handle, indent=1, default=str)
    print(f"wrote {os.path.join(args.output, 'scaling.md')} and scaling.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
