"""Scaling curves: time and memory of per-sample gradients, exact IF, CG, Arnoldi and TracIn as N and P grow.

Setting (no download: synthetic data and scikit-learn's bundled digits only). Inputs x in R^64 are drawn as
``mu_y + 2 eps`` with ten class means ``mu_c ~ N(0, I)``, ``eps ~ N(0, I)`` and uniform integer labels; the loss is
``SparseCategoricalCrossentropy(from_logits=True, reduction=None)``. The model is an MLP
``Input(64) -> Dense(h, relu) -> Dense(10)`` (logits) with every layer watched
(``InfluenceModel(model, start_layer=0, last_layer=-1)``): P = 75 h + 10. It is trained for 10 epochs (Adam, batch
128, learning rate ``1e-2 · min(1, sqrt(32 / h))``) on the first 2,000 samples of the (prefix-stable) training stream
whatever N, so that for a given seed the weights are the same at every N. This keeps ``H + 0.1 I`` positive definite,
which CG needs (it raises otherwise): with fewer epochs, or a learning rate of 1e-2 at every width, the wide nets ended
where it is not and CG rightly refused (the smallest eigenvalues measured are in ``benchmarks/README.md``). The
training set of a point is the first N samples of that stream. Datasets are ``tf.data`` batches of 128; damping
lambda = 0.1 everywhere.

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
  the batches materialised beforehand as a list of tensors: iterating a ``tf.data`` dataset costs about as much per
  batch as the whole plain pass of a small MLP batch (``benchmarks/README.md``) and would hide the ratio. Median
  of ``--repeats`` warm runs, the two interleaved;
* ``exact``: ``ExactIHVP(train, regularization=0.1)`` construction (mean Hessian + factorisation) plus the
  self-influence of all N (``FirstOrderInfluenceCalculator.self_influence``). Above ``--exact-max-n`` training
  samples or ``--exact-max-p`` parameters it is skipped (the factorisation is O(P^3); when the damped Hessian is not
  positive definite the library falls back to a float64 ``tf.linalg.eigh``, which alone takes minutes at a few
  thousand parameters: ``benchmarks/README.md``). Where the P x P matrices exceed the library's own memory budget
  the library refuses by itself and the refusal is recorded;
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
``--timeout`` seconds. Columns: ``peak`` = ``ru_maxrss`` of the subprocess (TensorFlow's own memory included);
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

The code: ``scaling_problems.py`` (settings, probes, data, models, the gradient passes), ``scaling_worker.py`` (the
measurement subprocess), ``scaling_report.py`` (fits, tables, plots) and this driver.

Usage::

    .venv/bin/python benchmarks/bench_scaling.py --quick                 # smoke test (minutes)
    .venv/bin/python benchmarks/bench_scaling.py                         # full run (durations in README.md)
    .venv/bin/python benchmarks/bench_scaling.py --sweeps N --methods cg tracin --n-values 1000 10000 100000
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from bench_common import proc_status_kib  # pylint: disable=C0411
from scaling_problems import (DEFAULT_N_VALUES, DEFAULT_P_VALUES, GIB, KIB, METHODS,  # pylint: disable=C0411
                              N_SWEEP_HIDDEN, N_SWEEP_TEST, P_SWEEP_TEST, P_SWEEP_TRAIN, QUICK_N_VALUES,
                              QUICK_P_VALUES, RATIO_BATCH_SIZES, RESULT_TAG, SWEEPS, hidden_for_params, mlp_params)
from scaling_report import plot_sweep, report  # pylint: disable=C0411
from scaling_worker import exact_skip_reason, worker_main  # pylint: disable=C0411


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


# -------- Command line -------------------------------------------------------------------------------------------
def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and complete the command line (``--quick`` fills in small defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweeps, one process per size (a smoke test)")
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
