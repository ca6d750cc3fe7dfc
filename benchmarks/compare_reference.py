"""Side-by-side benchmark of this library against the reference Influenciae 0.3.0.

Both sides compute, on identical weights and data, the first-order influence (Koh & Liang 2017)
``I(t, z) = g(t)^T H^+ g(z)`` with an exact (pseudo-)inverse of the mean Hessian of the loss
w.r.t. the last Dense layer of an MLP 64-32-16-10 (ReLU, logits output; P = 170 parameters)
trained on scikit-learn's bundled ``load_digits``:

* the Hessian (``ExactIHVP`` construction),
* the self-influence of the training set (ours: ``self_influence``; the reference: its lazy
  ``compute_influence_values`` concatenated),
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

The code: ``reference_problem.py`` (data, weights, problem file, the timed phases), ``reference_arbiter.py`` (the
float64 arbiter), ``guarded_run.py`` (guarded subprocesses), ``reference_report.py`` (tables, verdict) and this
driver.

Usage
-----
``python benchmarks/compare_reference.py`` (creates the reference environment on first use; this
is the only step that needs network access), ``--setup`` to only create it, ``--help`` for options.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from guarded_run import BENCH_DIR, REPO_ROOT, RunOutcome, ours_env, run_reported
from reference_arbiter import compute_arbiters
from reference_problem import (LAYER_SIZES, build_mlp, load_digits_split, load_problem, run_phases, save_problem,
                               train_weights)
from reference_report import PHASES, best_ratio, report

REF_VENV = BENCH_DIR / ".venv-reference"
REF_PYTHON = REF_VENV / "bin" / "python"
RUNNER = BENCH_DIR / "reference_runner.py"
REF_REQUIREMENTS = ("tensorflow==2.21.*", "scikit-learn", "matplotlib")
REF_NO_DEPS = ("influenciae==0.3.0", "tf-keras==2.21.0")
TIMING_KEYS = tuple(f"time_{phase}" for phase in PHASES) + tuple(f"warm_{phase}" for phase in PHASES) + \
    tuple(f"rss_{phase}_mib" for phase in PHASES)


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


# -------- This library's side ------------------------------------------------------------
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

    _, results = run_phases(build, lambda calculator, dataset: calculator.self_influence(dataset), train_ds, test_ds,
                            (arrays["x_test"].shape[0], arrays["x_train"].shape[0]), repeats)
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


# -------- Sides in guarded subprocesses ---------------------------------------------------
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
    return run_reported(command, env, output, (args.timeout, args.max_rss_mib))


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
