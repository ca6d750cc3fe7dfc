"""Side-by-side benchmark of this library against the reference Influenciae 0.3.0.

Both sides compute, on identical weights and data, the first-order influence (Koh & Liang 2017)
``I(t, z) = g(t)^T H^+ g(z)`` with an exact (pseudo-)inverse of the mean Hessian of the loss
w.r.t. the last Dense layer of an MLP 64-32-16-10 (ReLU, logits output; P = 170 parameters)
trained on scikit-learn's bundled ``load_digits``:

* the Hessian (``ExactIHVP`` construction),
* the self-influence of the training set (``_compute_influence_values``),
* the pairwise influence of a test set against the training set
  (``estimate_influence_values_in_batches``, collected into an ``(N_test, N_train)`` matrix).

The reference runs in its own virtual environment (``benchmarks/.venv-reference``, TensorFlow 2.21
with legacy Keras selected by ``TF_USE_LEGACY_KERAS=1``) through ``reference_runner.py``; this
library runs in the current interpreter's environment with Keras 3. Every configuration runs in a
fresh subprocess, so the first pass includes tracing and the peak resident set size (``ru_maxrss``) is
per configuration; the passes repeated after it in the same process (``--repeats``, medians) give the warm
times, measured as in ``bench_peers.py``. Task (f) of the performance issue compares Hessian +
self-influence at each side's best batch size, in both ways. Float64 NumPy values of
``g^T pinv(H_mean) g``, from the closed-form gradient and Hessian of the softmax cross-entropy, serve as an
independent arbiter.

Usage
-----
``python benchmarks/compare_reference.py`` (creates the reference environment on first use; this
is the only step that needs network access), ``--setup`` to only create it, ``--help`` for options.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reference_report import PHASES, best_ratio, report

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REF_VENV = BENCH_DIR / ".venv-reference"
REF_PYTHON = REF_VENV / "bin" / "python"
RUNNER = BENCH_DIR / "reference_runner.py"
LAYER_SIZES = (64, 32, 16, 10)
REF_REQUIREMENTS = ("tensorflow==2.21.*", "scikit-learn", "matplotlib")
REF_NO_DEPS = ("influenciae==0.3.0", "tf-keras==2.21.0")
TIMING_KEYS = tuple(f"time_{phase}" for phase in PHASES) + tuple(f"warm_{phase}" for phase in PHASES) + \
    tuple(f"rss_{phase}_mib" for phase in PHASES)
EPS_FLOAT32 = 2.0 ** -23


# -------- Reference environment -----------------------------------------------------------
def reference_env() -> Dict[str, str]:
    """Environment for processes running the reference (legacy Keras).

    Returns
    -------
    dict
        A copy of ``os.environ`` with ``TF_USE_LEGACY_KERAS=1`` and without ``PYTHONPATH`` (so that
        ``import deel.influenciae`` finds the reference, not this repository).
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["TF_USE_LEGACY_KERAS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def reference_is_ready() -> bool:
    """Check that the reference environment exists and imports the reference package.

    Returns
    -------
    bool
        True when ``deel.influenciae`` 0.3.0 imports under legacy Keras in the reference venv.
    """
    if not REF_PYTHON.exists():
        return False
    probe = ("import tensorflow as tf; assert tf.keras.Model.__module__.startswith('tf_keras'); "
             "from deel.influenciae.common import ExactIHVP, InfluenceModel; "
             "from deel.influenciae.influence import FirstOrderInfluenceCalculator")
    completed = subprocess.run([str(REF_PYTHON), "-c", probe], env=reference_env(), cwd=str(BENCH_DIR),
                               capture_output=True, check=False)
    return completed.returncode == 0


def setup_reference(force: bool = False) -> None:
    """Create the reference virtual environment (needs network access to PyPI).

    Parameters
    ----------
    force
        Delete and recreate the environment even if it already works.
    """
    if force and REF_VENV.exists():
        shutil.rmtree(REF_VENV)
    if reference_is_ready():
        print(f"reference environment ready: {REF_VENV}")
        return
    print(f"creating the reference environment in {REF_VENV} (TensorFlow 2.21, tf-keras, influenciae 0.3.0)")
    steps = [
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(REF_VENV)],
        # matplotlib: ``import deel.influenciae`` imports its plotting module.
        [str(REF_PYTHON), "-m", "pip", "install", "--quiet", *REF_REQUIREMENTS],
        # influenciae 0.3.0 pins tensorflow<2.10: install it without its dependencies.
        [str(REF_PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", *REF_NO_DEPS],
    ]
    for step in steps:
        print("  $", " ".join(step))
        subprocess.run(step, check=True)
    if not reference_is_ready():
        raise RuntimeError(f"the reference environment in {REF_VENV} does not import deel.influenciae 0.3.0")
    print("reference environment ready")


# -------- Problem: data and trained weights -----------------------------------------------
def load_digits_split(n_train: int, n_test: int, seed: int) -> Dict[str, np.ndarray]:
    """Split scikit-learn's bundled digits (no network needed) into train and test sets.

    Parameters
    ----------
    n_train
        Number of training samples.
    n_test
        Number of test samples (disjoint from the training samples).
    seed
        Seed of the permutation.

    Returns
    -------
    dict
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` as float32 arrays; inputs scaled to
        [0, 1], targets one-hot.
    """
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    digits = load_digits()
    if n_train + n_test > digits.data.shape[0]:
        raise ValueError(f"digits has {digits.data.shape[0]} samples, {n_train + n_test} requested")
    order = np.random.default_rng(seed).permutation(digits.data.shape[0])
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[digits.target[order]]
    return {"x_train": x[:n_train], "y_train": y[:n_train],
            "x_test": x[n_train:n_train + n_test], "y_test": y[n_train:n_train + n_test]}


def build_mlp(layer_sizes: Sequence[int], weights: Optional[List[np.ndarray]] = None) -> Any:
    """Build the Keras 3 MLP (ReLU hidden layers, logits output).

    Parameters
    ----------
    layer_sizes
        Input width followed by the width of every Dense layer.
    weights
        Weights to load, in ``get_weights()`` order (default: keep the random initialisation).

    Returns
    -------
    keras.Sequential
        The built model.
    """
    import keras  # pylint: disable=import-outside-toplevel

    layers = [keras.Input(shape=(int(layer_sizes[0]),))]
    for index, width in enumerate(layer_sizes[1:]):
        activation = "relu" if index < len(layer_sizes) - 2 else None
        layers.append(keras.layers.Dense(int(width), activation=activation, name=f"dense_{index}"))
    model = keras.Sequential(layers)
    if weights is not None:
        model.set_weights(weights)
    return model


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
    import keras  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(seed)
    model = build_mlp(LAYER_SIZES)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], batch_size=32, epochs=epochs, shuffle=True, verbose=0)
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


# -------- Float64 arbiter -----------------------------------------------------------------
def mlp_forward(x: np.ndarray, weights: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Forward pass of the MLP in float64.

    Parameters
    ----------
    x
        Inputs, shape ``(N, D)``.
    weights
        MLP weights in ``get_weights()`` order (ReLU hidden layers, linear last layer).

    Returns
    -------
    tuple
        The input of the last layer ``(N, H)`` and the softmax probabilities ``(N, C)``.
    """
    hidden = x.astype(np.float64)
    params = [np.asarray(weight, dtype=np.float64) for weight in weights]
    for kernel, bias in zip(params[0:-2:2], params[1:-2:2]):
        hidden = np.maximum(hidden @ kernel + bias, 0.0)
    logits = hidden @ params[-2] + params[-1]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return hidden, probs / probs.sum(axis=1, keepdims=True)


def last_layer_terms(x: np.ndarray, y: np.ndarray, weights: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients and summed Hessian of the cross-entropy w.r.t. the last Dense layer, in float64.

    With logits ``z = W^T h + b`` (``W`` of shape ``(H, C)``), ``p = softmax(z)`` and ``r = p - y``,
    the gradient is ``(vec(h r^T), r)`` (kernel flattened row-major, then bias, like both libraries)
    and the Hessian is ``J^T (diag(p) - p p^T) J`` with ``J = dz/d(W, b) = [h^T (x) I_C, I_C]``.

    Parameters
    ----------
    x
        Inputs, shape ``(N, D)``.
    y
        One-hot targets, shape ``(N, C)``.
    weights
        MLP weights in ``get_weights()`` order (ReLU hidden layers, linear last layer).

    Returns
    -------
    tuple
        Gradients ``(N, P)`` and the sum over the samples of their Hessians ``(P, P)``.
    """
    hidden, probs = mlp_forward(x, weights)
    residual = probs - y.astype(np.float64)
    n_samples, n_classes = probs.shape
    grads = np.concatenate([np.einsum("ni,nk->nik", hidden, residual).reshape(n_samples, -1), residual], axis=1)
    eye = np.eye(n_classes)
    jac = np.concatenate([np.einsum("ni,kl->nkil", hidden, eye).reshape(n_samples, n_classes, -1),
                          np.broadcast_to(eye, (n_samples, n_classes, n_classes))], axis=2)
    curvature = probs[:, :, None] * eye - probs[:, :, None] * probs[:, None, :]
    return grads, np.einsum("nkp,nkl,nlq->pq", jac, curvature, jac)


@dataclass
class Arbiter:
    """Float64 ground truth ``g(t)^T pinv(H_mean) g(z)`` for one pseudo-inverse cut-off.

    Attributes
    ----------
    name
        Label used in the report.
    rcond
        Eigenvalues with ``|lambda| <= rcond * max|lambda|`` are dropped (the rule of
        ``tf.linalg.pinv`` applied to singular values, which are ``|lambda|`` here).
    self_influence
        ``(N_train,)`` self-influence values.
    pairwise
        ``(N_test, N_train)`` influence values.
    rank
        Number of eigenvalues kept.
    margin
        How far the eigenvalue closest to the cut-off ``c = rcond * max|lambda|`` lies from it, as a
        ratio: ``min over lambda of max(|lambda| / c, c / |lambda|)`` (>= 1). Close to 1 (below ~1.01),
        float32 rounding can move that eigenvalue across the cut-off and change the values by O(1).
    """

    name: str
    rcond: float
    self_influence: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    pairwise: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    rank: int = 0
    margin: float = 1.0

    def solve(self, hessian: np.ndarray, train_grads: np.ndarray, test_grads: np.ndarray) -> "Arbiter":
        """Fill the values from the mean Hessian and the gradients.

        Parameters
        ----------
        hessian
            Mean Hessian ``(P, P)``, float64.
        train_grads
            Training gradients ``(N_train, P)``.
        test_grads
            Test gradients ``(N_test, P)``.

        Returns
        -------
        Arbiter
            ``self``, filled.
        """
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (hessian + hessian.T))
        cutoff = self.rcond * np.abs(eigenvalues).max()
        keep = np.abs(eigenvalues) > cutoff
        influence_vectors = train_grads @ ((eigenvectors[:, keep] / eigenvalues[keep]) @ eigenvectors[:, keep].T)
        self.self_influence = np.einsum("np,np->n", influence_vectors, train_grads)
        self.pairwise = test_grads @ influence_vectors.T
        self.rank = int(keep.sum())
        with np.errstate(divide="ignore"):
            ratios = np.abs(eigenvalues) / cutoff
            self.margin = float(np.min(np.maximum(ratios, 1.0 / ratios)))
        return self


def compute_arbiters(data: Dict[str, np.ndarray], weights: List[np.ndarray], exact_rcond: float) -> List[Arbiter]:
    """Float64 values with the pinv cut-off of TF/NumPy for float32 and with a null-space-only cut-off.

    Parameters
    ----------
    data
        Train/test arrays.
    weights
        Model weights.
    exact_rcond
        Cut-off of the ``"f64 exact"`` arbiter (small enough to drop only the exact null space).

    Returns
    -------
    list of Arbiter
        ``"f64 pinv"`` (``rcond = 10 P eps_float32``, the default of ``tf.linalg.pinv`` on the
        float32 Hessian that the reference inverts) and ``"f64 exact"``.
    """
    train_grads, hessian_sum = last_layer_terms(data["x_train"], data["y_train"], weights)
    test_grads, _ = last_layer_terms(data["x_test"], data["y_test"], weights)
    hessian = hessian_sum / data["x_train"].shape[0]
    return [Arbiter("f64 pinv", 10.0 * hessian.shape[0] * EPS_FLOAT32).solve(hessian, train_grads, test_grads),
            Arbiter("f64 exact", exact_rcond).solve(hessian, train_grads, test_grads)]


# -------- Measured phases (shared with reference_runner.py) and this library's side -------
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


def run_phases(build: Callable[[], Tuple[Any, Any]], train_ds: Any, test_ds: Any,
               shape: Tuple[int, int], repeats: int = 0) -> Tuple[Any, Dict[str, np.ndarray]]:
    """Time the three phases: Hessian, self-influence, pairwise influence; then repeat them.

    Both sides call this function (``reference_runner.py`` imports it), so they measure the same calls. The
    first pass (tracing included) gives the values, ``time_<phase>`` and the peak RSS after each phase; the
    ``repeats`` passes after it (a new IHVP and calculator each time, compiled functions already traced) give
    ``warm_<phase>``, the median of their times (NaN without repeats).

    Parameters
    ----------
    build
        Builds and returns ``(ihvp, calculator)``; the Hessian is computed there.
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
        self_influence, *self_measures = timed(
            lambda calc=calculator: np.asarray(calc._compute_influence_values(train_ds)))  # pylint: disable=W0212
        pairwise, *pairwise_measures = timed(
            lambda calc=calculator: collect_pairwise(calc.estimate_influence_values_in_batches(test_ds, train_ds),
                                                     *shape))
        measures = dict(zip(PHASES, (hessian_measures, self_measures, pairwise_measures)))
        if index == 0:  # the first pass gives the values, the first-call times and the peak RSS
            first_ihvp = ihvp
            results.update(self_influence=self_influence.reshape(-1), pairwise=pairwise)
            results.update({f"time_{phase}": np.array(seconds) for phase, (seconds, _) in measures.items()})
            results.update({f"rss_{phase}_mib": np.array(rss) for phase, (_, rss) in measures.items()})
        else:
            for phase, (seconds, _) in measures.items():
                warm_seconds[phase].append(seconds)
    results.update({f"warm_{phase}": np.array(np.median(times) if times else np.nan)
                    for phase, times in warm_seconds.items()})
    return first_ihvp, results


def run_ours(arrays: Dict[str, np.ndarray], weights: List[np.ndarray], batch_size: int,
             test_batch_size: int, repeats: int = 0) -> Dict[str, np.ndarray]:
    """Compute self-influence and pairwise influence with this library (Keras 3).

    Parameters
    ----------
    arrays
        Train/test arrays and ``layer_sizes``.
    weights
        Model weights in ``get_weights()`` order.
    batch_size
        Training batch size.
    test_batch_size
        Test batch size.
    repeats
        Warm passes after the first one (see :func:`run_phases`).

    Returns
    -------
    dict
        Values, timings and peak RSS, with the same keys as ``reference_runner.py`` writes.
    """
    # pylint: disable=import-outside-toplevel
    import keras
    import tensorflow as tf

    from deel.influenciae import common, influence

    if REPO_ROOT not in Path(common.__file__).resolve().parents:
        raise RuntimeError(f"deel.influenciae was imported from {common.__file__}, not from {REPO_ROOT}")
    train_ds, test_ds = (tf.data.Dataset.from_tensor_slices((arrays[f"x_{part}"], arrays[f"y_{part}"])).batch(size)
                         for part, size in (("train", batch_size), ("test", test_batch_size)))
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = common.InfluenceModel(build_mlp(arrays["layer_sizes"].tolist(), weights), start_layer=-1,
                                            loss_function=loss)

    def build() -> Tuple[Any, Any]:
        ihvp = common.ExactIHVP(influence_model, train_ds)
        return ihvp, influence.FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)

    _, results = run_phases(build, train_ds, test_ds, (arrays["x_test"].shape[0], arrays["x_train"].shape[0]),
                            repeats)
    return dict(results, n_params=np.array(int(influence_model.nb_params)))


def ours_worker(args: argparse.Namespace) -> int:
    """Subprocess entry point for this library's side (``--ours-worker``).

    Parameters
    ----------
    args
        Parsed options (``input``, ``output``, ``batch_size``, ``test_batch_size``, ``seed``, ``repeats``).

    Returns
    -------
    int
        The exit status.
    """
    import keras  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(args.seed)
    arrays, weights = load_problem(Path(args.input))
    test_batch_size = args.test_batch_size or min(args.batch_size, arrays["x_test"].shape[0])
    np.savez(args.output, **run_ours(arrays, weights, args.batch_size, test_batch_size, args.repeats))
    return 0


# -------- Guarded subprocesses ------------------------------------------------------------
@dataclass
class RunOutcome:
    """What a guarded subprocess produced.

    Attributes
    ----------
    status
        ``"ok"``, ``"failed"``, ``"timeout"`` or ``"memory"`` (killed by the RSS guard).
    seconds
        Wall time of the whole subprocess (interpreter start and imports included).
    results
        Arrays read from the subprocess' output file (empty unless ``status == "ok"``).
    message
        Tail of the subprocess' output when it did not succeed.
    """

    status: str
    seconds: float
    results: Dict[str, np.ndarray] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run succeeded and produced results.

        Returns
        -------
        bool
            ``status == "ok"``.
        """
        return self.status == "ok"


def process_rss_mib(pid: int) -> float:
    """Current resident set size of a process, read from ``/proc``.

    Parameters
    ----------
    pid
        Process id.

    Returns
    -------
    float
        ``VmRSS`` in MiB, or 0 when it cannot be read (process gone, not Linux).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def run_guarded(command: List[str], env: Dict[str, str], output: Path, limits: Tuple[float, float]) -> RunOutcome:
    """Run a command, killing it when it exceeds a wall-time or resident-memory limit.

    Parameters
    ----------
    command
        The command line.
    env
        Its environment.
    output
        The ``.npz`` file the command writes on success.
    limits
        Wall-time limit in seconds and resident-memory limit in MiB (polled every 50 ms).

    Returns
    -------
    RunOutcome
        Status, duration, results and error message.
    """
    start, status = time.perf_counter(), ""
    with tempfile.TemporaryFile() as log, subprocess.Popen(command, env=env, cwd=str(BENCH_DIR), stdout=log,
                                                           stderr=subprocess.STDOUT) as process:
        while process.poll() is None and not status:
            if time.perf_counter() - start > limits[0]:
                status = "timeout"
            elif process_rss_mib(process.pid) > limits[1]:
                status = "memory"
            else:
                time.sleep(0.05)
        if status:
            process.kill()
            process.wait()
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    status = status or ("ok" if process.returncode == 0 and output.exists() else "failed")
    if status != "ok":
        noise = ("I0000", "W0000", "E0000", "WARNING: All log messages")
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith(noise)]
        reason = {"timeout": f"killed after {limits[0]:.0f} s", "memory": f"killed above {limits[1]:.0f} MiB RSS"}
        return RunOutcome(status=status, seconds=seconds,
                          message="\n".join(lines[-15:] + [reason.get(status, f"exit status {process.returncode}")]))
    with np.load(output) as archive:
        return RunOutcome(status=status, seconds=seconds, results={key: archive[key] for key in archive.files})


def ours_env() -> Dict[str, str]:
    """Environment for processes running this library (Keras 3).

    Returns
    -------
    dict
        ``os.environ`` without ``TF_USE_LEGACY_KERAS`` and with the repository root first on
        ``PYTHONPATH`` (so the working tree is used even when the package is not installed).
    """
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_side(name: str, batch: int, args: argparse.Namespace) -> RunOutcome:
    """Run one side for one batch size in a guarded subprocess.

    Parameters
    ----------
    name
        ``"ref"`` or ``"ours"``.
    batch
        Training batch size.
    args
        Parsed options, plus ``problem`` (input file), ``workdir`` and ``max_rss_mib``.

    Returns
    -------
    RunOutcome
        The outcome.
    """
    output = args.workdir / f"{name}_bs{batch}.npz"
    output.unlink(missing_ok=True)
    common = ["--input", str(args.problem), "--output", str(output), "--batch-size", str(batch),
              "--seed", str(args.seed), "--repeats", str(args.repeats)]
    if name == "ref":
        command, env = [str(REF_PYTHON), str(RUNNER)] + common, reference_env()
    else:
        command, env = [sys.executable, str(Path(__file__).resolve()), "--ours-worker"] + common, ours_env()
    print(f"  running {name:4s} batch {batch:5d} ...", end=" ", flush=True)
    outcome = run_guarded(command, env, output, (args.timeout, args.max_rss_mib))
    print(f"{outcome.status} in {outcome.seconds:.1f} s")
    if not outcome.ok:
        print("    " + outcome.message.replace("\n", "\n    "))
    return outcome


# -------- Driver --------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv
        Arguments without the program name.

    Returns
    -------
    argparse.Namespace
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    add = parser.add_argument
    add("--setup", action="store_true", help="only create the reference environment, then exit")
    add("--force-setup", action="store_true", help="delete and recreate the reference environment, then exit")
    add("--batch-sizes", type=int, nargs="+", default=[10, 25], help="batch sizes run on both sides (default: 10 25)")
    add("--ours-only-batch-sizes", type=int, nargs="*", default=[100, 1000],
        help="batch sizes run only on this library's side (default: 100 1000)")
    add("--skip-reference", action="store_true", help="run only this library's side")
    add("--skip-ours", action="store_true", help="run only the reference side")
    add("--n-train", type=int, default=1000, help="training samples (default: 1000)")
    add("--n-test", type=int, default=100, help="test samples (default: 100)")
    add("--epochs", type=int, default=10, help="training epochs (default: 10)")
    add("--seed", type=int, default=4, help="seed of the split and of the training (default: 4)")
    add("--tolerance", type=float, default=1e-4,
        help="PASS when the ours-vs-reference max relative differences are at most this (default: 1e-4)")
    add("--exact-rcond", type=float, default=1e-10,
        help="relative eigenvalue cut-off of the 'f64 exact' arbiter, which drops only the exact null space "
             "of the Hessian (default: 1e-10)")
    add("--repeats", type=int, default=3,
        help="passes repeated after the first one in each process; their median is the warm time (default: 3)")
    add("--timeout", type=float, default=1800.0, help="wall-time limit per subprocess in seconds (default: 1800)")
    add("--max-rss-gb", type=float, default=None,
        help="resident-memory limit per subprocess in GiB (default: 75%% of the physical memory)")
    add("--workdir", default=None, help="keep the problem and result files in this folder")
    add("--json", default=None, help="also write the numbers to this JSON file")
    add("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    add("--input", help=argparse.SUPPRESS)
    add("--output", help=argparse.SUPPRESS)
    add("--batch-size", type=int, help=argparse.SUPPRESS)
    add("--test-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_max_rss_mib() -> float:
    """Three quarters of the physical memory.

    Returns
    -------
    float
        The limit in MiB (16 GiB when the memory size cannot be read).
    """
    try:
        return 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    except (ValueError, OSError):
        return 16.0 * 1024


def run_benchmark(args: argparse.Namespace) -> bool:
    """Train the model, run both sides and print the report.

    Parameters
    ----------
    args
        Parsed options, plus ``workdir``.

    Returns
    -------
    bool
        True on PASS.
    """
    args.max_rss_mib = args.max_rss_gb * 1024 if args.max_rss_gb else default_max_rss_mib()
    data = load_digits_split(args.n_train, args.n_test, args.seed)
    weights, accuracy = train_weights(data, args.epochs, args.seed)
    args.problem = args.workdir / "problem.npz"
    save_problem(args.problem, data, weights)
    arbiters = compute_arbiters(data, weights, args.exact_rcond)
    print(f"MLP {'-'.join(map(str, LAYER_SIZES))} trained {args.epochs} epochs (seed {args.seed}) on digits "
          f"(N_train={args.n_train}, N_test={args.n_test}): test accuracy {accuracy:.3f}, "
          f"last layer P={weights[-2].size + weights[-1].size}")
    if arbiters[0].margin < 1.01:
        print(f"WARNING: an eigenvalue of the mean Hessian lies a factor {arbiters[0].margin:.5f} from the pinv "
              "cut-off: float32 rounding may keep it on one side and drop it on the other (try another --seed)")

    outcomes: Dict[Tuple[str, int], RunOutcome] = {}
    batches = list(dict.fromkeys(args.batch_sizes + list(args.ours_only_batch_sizes)))
    for batch in batches:
        if not args.skip_reference and batch in args.batch_sizes:
            outcomes[("ref", batch)] = run_side("ref", batch, args)
        if not args.skip_ours:
            outcomes[("ours", batch)] = run_side("ours", batch, args)
    passed, metrics = report(batches, outcomes, arbiters, args.tolerance)
    if args.json:
        runs = {f"{side}/{batch}": dict({key: float(outcome.results[key]) for key in TIMING_KEYS if outcome.ok},
                                        status=outcome.status, seconds=outcome.seconds)
                for (side, batch), outcome in outcomes.items()}
        summary = {"seed": args.seed, "epochs": args.epochs, "test_accuracy": accuracy, "pass": passed,
                   "repeats": args.repeats,
                   "task_f": {prefix: best_ratio(outcomes, prefix) for prefix in ("time", "warm")},
                   "arbiters": {a.name: {"rank": a.rank, "rcond": a.rcond, "margin": a.margin} for a in arbiters},
                   "errors": metrics, "runs": runs}
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return passed


def main(argv: Sequence[str]) -> int:
    """Entry point.

    Parameters
    ----------
    argv
        Arguments without the program name.

    Returns
    -------
    int
        0 on PASS (or after ``--setup``), 1 on FAIL.
    """
    args = parse_args(argv)
    if args.ours_worker:
        return ours_worker(args)
    if args.setup or args.force_setup:
        setup_reference(force=args.force_setup)
        return 0
    if not args.skip_reference:
        setup_reference()
    for batch in args.batch_sizes + list(args.ours_only_batch_sizes):
        if args.n_train % batch or args.n_test % min(batch, args.n_test):
            raise SystemExit(f"batch size {batch} must divide --n-train {args.n_train}, and min(batch size, "
                             f"--n-test) must divide --n-test {args.n_test} (the reference needs full batches)")
    keep_files = args.workdir is not None
    args.workdir = Path(args.workdir) if keep_files else Path(tempfile.mkdtemp(prefix="influenciae_cmp_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        passed = run_benchmark(args)
    finally:
        if not keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
