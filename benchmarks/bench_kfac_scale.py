"""K-FAC / EK-FAC at scale: fit, self-influence and pairwise influence as ratios to one plain forward+backward epoch.

Models and data are those of ``bench_real_models.py`` (imported, not copied): the ResNet-style CNN (~0.33 M
parameters; every Conv2D and Dense weight in a Kronecker block, the BatchNormalization scales and offsets left out
with ``unsupported_layers="skip"``) at N = 1,000 and 10,000 (``--quick``: 1,000 only), and the small transformer
(Embedding, MultiHeadAttention's EinsumDense projections, feed-forward Dense layers; LayerNormalization and the
learned position weight left out; the attention key projection's bias too, see the README) at the same sizes.
Weights as initialised, synthetic data: costs do not depend on training.

Every (model, N) runs in a fresh subprocess so that its peak resident memory is its own. In each one:

* the plain compiled forward + backward epoch (``bench_common.plain_step``, traced first): the unit of the ratios;
* ``EKFACIHVP(..., regularization=1e-3, fisher="empirical", unsupported_layers="skip")``: ``memory_estimate()``,
  then the fit, as a user pays it (tracing included), split by stage (covariances, eigendecompositions, corrected
  eigenvalues); then ``KFACIHVP``'s fit (a fresh solver);
* the self-influence of the N training samples, ``FirstOrderInfluenceCalculator(...,
  ihvp_calculator=ekfac).self_influence(train)``, after a warm-up on a full and the short last batch (as
  ``bench_real_models.py``; the warm-up's seconds are reported: the one-time tracing); the same values lazily,
  ``compute_influence_values(train)`` consumed (a ``tf.data`` map: its function runs on tf.data's threads, where
  on this 2-core machine a whole pass sometimes runs one thread at a time, about 2 times slower, see the README);
  then ``self_influence`` with the fitted solver read back with ``solve_dtype="float64"`` (the default is the
  model's dtype, float32);
* ``influence_matrix(test, train)`` for 100 test samples, after the same kind of warm-up;
* wall and CPU seconds (CPU time of the process, all threads: less sensitive to the other jobs of a shared
  machine), each call's peak RSS increase over the resident memory at its start (``bench_common.PeakMemory``) and
  the process's peak RSS;
* profile (not with ``--no-profile``): the stages' warm reruns (their tracing is the difference), the streamed
  per-sample gradients alone, and per-batch timings on one full batch extrapolated to the N samples: the
  self-influence's quadratic form from flat gradients and from the layers' factors in each solve dtype, the
  corrected-eigenvalue statistic, the pairwise pieces; last, the plain epoch again (how much the machine drifted).

Usage: ``.venv/bin/python benchmarks/bench_kfac_scale.py [--quick] [--sizes 1000 10000] [--batch-size 128]``;
writes ``benchmarks/results/kfac_scale.md`` and ``.json`` (``--output-dir``).
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position,C0413
from bench_common import KIB, plain_step, proc_status_kib, ru_maxrss_kib  # noqa: E402
from bench_real_models import LOSS, consume, measure, resnet, synthetic, transformer  # noqa: E402

# pylint: enable=wrong-import-position,C0413

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAGE_METHODS = (("covariances", "_fit_covariances"), ("eigendecompositions", "_fit_eigendecompositions"),
                 ("corrected eigenvalues", "_fit_corrected_eigenvalues"))
FLOAT64 = "solve_dtype=float64"
TARGETS = {"EK-FAC fit + self-influence": 10.0, f"EK-FAC fit + self-influence, {FLOAT64}": 10.0,
           "pairwise (100 tests x N)": 5.0}


class ProcessPeak:
    """This process's peak resident set size, MiB, across the resets of the kernel's high-water mark that
    ``PeakMemory`` does: ``VmHWM`` is read before every measured call and after it (``ru_maxrss`` elsewhere)."""

    peak_mib = 0.0

    @classmethod
    def note(cls) -> float:
        """Fold the current high-water mark in; return the peak so far."""
        current = proc_status_kib("VmHWM")
        current = current if current is not None else ru_maxrss_kib()
        cls.peak_mib = max(cls.peak_mib, current / KIB)
        return cls.peak_mib


def tracked(function: Callable[[], Any]) -> Dict[str, float]:
    """``bench_real_models.measure`` (seconds, peak RSS increase) with the process's CPU seconds (all threads; less
    sensitive than wall time to the other jobs of a shared machine) and its peak kept up to date."""
    ProcessPeak.note()
    cpu = time.process_time()
    result = measure(function)
    result["cpu_seconds"] = time.process_time() - cpu
    ProcessPeak.note()
    return result


def rss_mib() -> float:
    """This process's resident set size now, MiB (NaN where ``/proc`` is unavailable)."""
    current = proc_status_kib("VmRSS")
    return float("nan") if current is None else current / KIB


def time_stages(solver: Any) -> Dict[str, Dict[str, float]]:
    """Wrap the fit stages of a (not yet fitted) K-FAC solver so that each records its wall and CPU seconds in the
    returned dict (filled when the fit runs). ``_fit`` looks the stage methods up on the instance, so instance
    attributes win."""
    seconds: Dict[str, Dict[str, float]] = {}
    for stage, attribute in STAGE_METHODS:
        original = getattr(solver, attribute)

        def wrapper(blocks: Any, original: Callable = original, stage: str = stage) -> None:
            start, cpu = time.perf_counter(), time.process_time()
            original(blocks)
            seconds[stage] = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}

        setattr(solver, attribute, wrapper)
    return seconds


def coverage(influence_model: Any, solver: Any) -> Dict[str, Any]:
    """Which watched weights are in a Kronecker block and which are left out, with their parameter counts."""
    watched = influence_model.kernels.watched
    sizes = list(influence_model.kernels.sizes)
    blocks = [{"layer": block.name, "kernel": watched[block.kernel_position].path, "type": block.layer_type,
               "rows": block.rows, "out": block.out_size, "params": block.nb_params, "bias": block.homogeneous,
               "diagonal A": block.diagonal_rows}
              for block in solver.blocks]
    skipped = [{"weight": watched[position].path, "params": int(sizes[position])}
               for position in solver.structure.skipped]
    return {"blocks": blocks, "skipped": skipped, "reasons": list(solver.structure.reasons),
            "covered_params": int(sum(block["params"] for block in blocks)),
            "skipped_params": int(sum(weight["params"] for weight in skipped))}


class Rows:
    """The rows of one (model, N) run: seconds, ratio to the plain epoch, peak RSS increase."""

    def __init__(self, model_name: str, count: int, baseline: Dict[str, float]):
        self.model_name, self.count, self.baseline = model_name, count, baseline
        self.rows: List[Dict[str, Any]] = []

    def add(self, step: str, timing: Dict[str, float], kind: str = "main", note: str = "") -> Dict[str, Any]:
        """Record (and print) one step; ``timing`` holds ``seconds`` and optionally ``cpu_seconds``, ``peak_mib``."""
        seconds, cpu = timing["seconds"], timing.get("cpu_seconds", float("nan"))
        row = {"model": self.model_name, "N": self.count, "step": step, "kind": kind, "seconds": seconds,
               "epochs": seconds / self.baseline["seconds"], "cpu_seconds": cpu,
               "cpu_epochs": cpu / self.baseline["cpu_seconds"], "peak_mib": timing.get("peak_mib", float("nan")),
               "note": note}
        self.rows.append(row)
        print(f"  {step:62s} {seconds:9.2f} s {row['epochs']:7.2f} epochs (CPU {row['cpu_epochs']:7.2f}) "
              f"{row['peak_mib']:8.1f} MiB {note}", flush=True)
        return row

    def measured(self, step: str, function: Callable[[], Any], kind: str = "main") -> Dict[str, Any]:
        """Time one call (with its peak RSS increase) and record it."""
        return self.add(step, tracked(function), kind)


def per_batch_seconds(function: Callable[[], Any], repeats: int = 3) -> Dict[str, float]:
    """Wall and CPU seconds of the fastest of ``repeats`` calls (after one warm-up call)."""
    function()
    best = {"seconds": float("inf"), "cpu_seconds": float("nan")}
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        function()
        seconds = time.perf_counter() - start
        if seconds < best["seconds"]:
            best = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu}
    return best


def scaled(timing: Dict[str, float], factor: float) -> Dict[str, float]:
    """A per-batch timing extrapolated to ``factor`` batches."""
    return {key: value * factor for key, value in timing.items()}


def float64_twin(ekfac: Any, model: Any, train: tf.data.Dataset) -> Optional[Any]:
    """The fitted EK-FAC solver with ``solve_dtype="float64"`` (its products in float64), read back from
    :meth:`save` without refitting; None when the library has no ``solve_dtype``."""
    if "solve_dtype" not in inspect.signature(type(ekfac).__init__).parameters:
        return None
    with tempfile.TemporaryDirectory() as directory:
        # load() takes λ from its arguments (it is not saved with the factors).
        return type(ekfac).load(ekfac.save(directory), model, train, solve_dtype="float64", verbose=False,
                                regularization=ekfac.regularization, damping_heuristic=ekfac.damping_heuristic)


def profile(rows: Rows, influence_model: Any, solvers: Dict[str, Any], train: tf.data.Dataset, test_inputs: tuple,
            first_batch: tuple) -> None:
    """Where the time goes: warm reruns of the fit stages (cold minus warm is tracing), the streamed per-sample
    gradients, and per-batch timings (one full batch, × N / B) of the self-influence's two forms (flat per-sample
    gradients then ``quadratic_form``; ``batch_quadratic_form`` from the layers' factors) in each solve dtype, of
    the corrected-eigenvalue statistic and of the pairwise pieces."""
    # pylint: disable=protected-access
    ekfac = solvers["float32"]
    blocks = ekfac.blocks
    for stage, attribute in STAGE_METHODS:
        method = getattr(type(ekfac), attribute)
        rows.measured(f"  EK-FAC {stage}, warm rerun", lambda method=method: method(ekfac, blocks), "profile")

    def per_sample():
        for batch in train:
            influence_model.batch_jacobian_tensor(tuple(batch)).numpy()

    influence_model.batch_jacobian_tensor(first_batch)
    rows.measured("  per-sample gradients, streamed (B, P) per batch", per_sample, "profile")
    gradients = tf.transpose(influence_model.batch_jacobian_tensor(first_batch))
    size = int(gradients.shape[1])
    batches = rows.count / size
    for dtype, solver in solvers.items():
        timing = per_batch_seconds(lambda solver=solver: solver.quadratic_form(gradients).numpy())
        rows.add(f"  quadratic_form of the flat gradients, {dtype}, all N", scaled(timing, batches), kind="profile",
                 note=f"{timing['seconds']:.3f} s per batch of {size}")
        if hasattr(solver, "batch_quadratic_form"):
            timing = per_batch_seconds(lambda solver=solver: solver.batch_quadratic_form(first_batch).numpy())
            rows.add(f"  batch_quadratic_form (from the factors), {dtype}, all N", scaled(timing, batches),
                     kind="profile", note=f"{timing['seconds']:.3f} s per batch, per-sample gradients included")
    statistic = ekfac._compiled.get("corrected")
    if statistic is not None:
        bases = ekfac.block_bases(ekfac.statistics_dtype)
        position = tf.constant((0, 0), tf.int64)
        timing = per_batch_seconds(lambda: [value.numpy() for value in statistic(first_batch, position, bases)])
        rows.add("  EK-FAC corrected-eigenvalue statistic, all N", scaled(timing, batches), kind="profile",
                 note=f"{timing['seconds']:.3f} s per batch")
    test_gradients = tf.transpose(influence_model.batch_jacobian_tensor(test_inputs))
    timing = per_batch_seconds(lambda: ekfac.solve(test_gradients).numpy(), repeats=2)
    rows.add("  EK-FAC solve of the 100 test gradients", timing, kind="profile")
    side = tf.transpose(tf.cast(ekfac.solve(test_gradients), tf.float32))
    timing = per_batch_seconds(lambda: tf.matmul(side, gradients).numpy())
    rows.add("  (100, P) x (P, B) products, all N", scaled(timing, batches), kind="profile",
             note=f"{timing['seconds']:.3f} s per batch")


def fit_rows(rows: Rows, influence_model: Any, train: tf.data.Dataset) -> tuple:
    """Fit EK-FAC (its memory estimate first) and K-FAC, recording the fits and their stages; returns the EK-FAC
    solver, its fit's timing and its memory estimate."""
    from deel.influenciae.common import EKFACIHVP, KFACIHVP  # pylint: disable=import-outside-toplevel

    ekfac = EKFACIHVP(influence_model, train, regularization=1e-3, fisher="empirical", unsupported_layers="skip",
                      verbose=False, fit_now=False)
    estimate = ekfac.memory_estimate()
    stages = time_stages(ekfac)
    fit = rows.measured("EK-FAC fit", ekfac.fit)
    for stage, _ in STAGE_METHODS:
        rows.add(f"  {stage}", stages[stage], kind="stage")
    kfac = KFACIHVP(influence_model, train, regularization=1e-3, fisher="empirical", unsupported_layers="skip",
                    verbose=False, fit_now=False)
    kfac_stages = time_stages(kfac)
    rows.measured("K-FAC fit", kfac.fit)
    for stage, _ in STAGE_METHODS[:2]:
        rows.add(f"  {stage}", kfac_stages[stage], kind="stage")
    return ekfac, fit, estimate


def run_child(model_name: str, count: int, batch_size: int, tests: int, repeats: int, with_profile: bool
              ) -> Dict[str, Any]:
    """One (model, N): every step, in this process; the rows, the memory estimate and the coverage."""
    # pylint: disable=import-outside-toplevel,too-many-locals
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.influence import FirstOrderInfluenceCalculator

    start_rss, load_start = rss_mib(), list(os.getloadavg())
    model = resnet() if model_name == "resnet" else transformer()
    inputs, labels = synthetic(model_name, count, 1)
    train = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)
    test_arrays = synthetic(model_name, tests, 2)
    test = tf.data.Dataset.from_tensor_slices(test_arrays).batch(batch_size)
    step = plain_step(model, LOSS)

    def epoch():
        for batch_inputs, targets in train:
            step(batch_inputs, targets).numpy()

    epoch()  # trace
    baseline = min((tracked(epoch) for _ in range(repeats)), key=lambda timing: timing["seconds"])
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)
    print(f"{model_name}: N = {count}, P = {influence_model.nb_params:,}, batch {batch_size}; plain epoch "
          f"{baseline['seconds']:.2f} s", flush=True)
    rows = Rows(model_name, count, baseline)
    rows.add("plain forward+backward epoch", baseline)
    batches = int(train.cardinality())
    first = train.take(1).concatenate(train.skip(batches - 1))  # a full batch and the short last one
    first_batch = tuple(next(iter(train)))

    ekfac, fit, estimate = fit_rows(rows, influence_model, train)
    calculator = FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=ekfac)
    warm = tracked(lambda: calculator.self_influence(first).numpy())
    rows.add("one-time: self-influence warm-up (2 batches, tracing)", warm, kind="warm-up")
    self_influence = rows.measured("EK-FAC self-influence of the N samples",
                                   lambda: calculator.self_influence(train).numpy())
    rows.add("EK-FAC fit + self-influence", {"seconds": fit["seconds"] + self_influence["seconds"],
                                             "cpu_seconds": fit["cpu_seconds"] + self_influence["cpu_seconds"],
                                             "peak_mib": max(fit["peak_mib"], self_influence["peak_mib"])},
             kind="total")
    rows.add("  the same with the self-influence's tracing",
             {key: fit[key] + warm[key] + self_influence[key] for key in ("seconds", "cpu_seconds")}, kind="total")
    consume(calculator.compute_influence_values(first))
    rows.measured("  the same, lazily: compute_influence_values (a tf.data map) consumed",
                  lambda: consume(calculator.compute_influence_values(train)), kind="profile")
    solvers = {"float32": ekfac}
    twin = float64_twin(ekfac, influence_model, train)
    if twin is not None:
        solvers["float64"] = twin
        twin_calculator = FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=twin)
        twin_calculator.self_influence(first).numpy()
        twin_self = rows.measured(f"EK-FAC self-influence of the N samples, {FLOAT64}",
                                  lambda: twin_calculator.self_influence(train).numpy())
        rows.add(f"EK-FAC fit + self-influence, {FLOAT64}",
                 {key: fit[key] + twin_self[key] for key in ("seconds", "cpu_seconds")}, kind="total")
    warm = tracked(lambda: calculator.influence_matrix(test, first).numpy())
    rows.add("one-time: pairwise warm-up (2 batches, tracing)", warm, kind="warm-up")
    matrix = {}
    pairwise = rows.measured(f"pairwise ({tests} tests x N)",
                             lambda: matrix.setdefault("value", calculator.influence_matrix(test, train).numpy()))
    pairwise["step"] = "pairwise (100 tests x N)" if tests == 100 else pairwise["step"]
    if with_profile:
        profile(rows, influence_model, solvers, train, tuple(tf.constant(array) for array in test_arrays),
                first_batch)
    rows.add("  plain epoch again, at the end (machine noise)",
             min((tracked(epoch) for _ in range(repeats)), key=lambda timing: timing["seconds"]), kind="check")
    return {"model": model_name, "N": count, "P": influence_model.nb_params, "batch_size": batch_size,
            "rows": rows.rows, "memory_estimate": {"factors": estimate.factors, "batch": estimate.batch},
            "coverage": coverage(influence_model, ekfac), "matrix_shape": list(matrix["value"].shape),
            "process_peak_mib": ProcessPeak.note(), "start_rss_mib": start_rss, "load_start": load_start,
            "load_end": list(os.getloadavg())}


def run_in_subprocess(model_name: str, count: int, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """``run_child`` in a fresh Python process (its own peak memory); None if it failed."""
    command = [sys.executable, "-u", os.path.abspath(__file__), "--child", model_name, str(count),
               "--batch-size", str(args.batch_size), "--tests", str(args.tests), "--repeats", str(args.repeats)]
    if args.no_profile:
        command.append("--no-profile")
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        result = None
        for line in process.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
    if process.returncode or result is None:
        print(f"{model_name} N = {count}: the subprocess failed (exit {process.returncode})", flush=True)
    return result


# Report -------------------------------------------------------------------------------------------------------------
def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


def _verdict(row: Dict[str, Any]) -> str:
    target = TARGETS.get(row["step"])
    if target is None:
        return ""
    wall = "yes" if row["epochs"] <= target else "NO"
    cpu = "yes" if row.get("cpu_epochs", float("nan")) <= target else "NO"
    return f"≤ {target:g}: {wall} (CPU: {cpu})"


def _step_table(runs: List[Dict[str, Any]], batch_size: int) -> List[str]:
    lines = [f"Batch {batch_size}. Seconds (wall) and × one plain forward+backward epoch of the same process; the "
             "same ratio in CPU seconds of the process (all threads: less sensitive to the other jobs of a shared "
             "machine); the peak RSS increase of the call over the resident memory at its start (MiB). The measured "
             "self-influence and pairwise calls follow a warm-up on 2 batches (`one-time` rows: mostly tracing); ↳ "
             "rows are parts (fit stages) or profile measurements (per-batch timings × N / B), not added to the "
             "totals. Load average (1 min) at the start and end of each run: "
             + "; ".join(f"{run['model']} N = {run['N']:,}: {run['load_start'][0]:.1f} → {run['load_end'][0]:.1f}"
                         for run in runs) + ".", "",
             "| model | N | P | step | seconds | × epoch | × epoch (CPU time) | target | peak RSS increase (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            step = row["step"].strip()
            step = f"↳ {step}" if row["step"].startswith(" ") else f"**{step}**" if row["step"] in TARGETS else step
            note = f" ({row['note']})" if row.get("note") else ""
            lines.append(f"| {run['model']} | {run['N']:,} | {run['P']:,} | {step}{note} | {_fmt(row['seconds'])} | "
                         f"{_fmt(row['epochs'])} | {_fmt(row.get('cpu_epochs', float('nan')))} | {_verdict(row)} | "
                         f"{_fmt(row['peak_mib'], 1)} |")
    return lines


def _memory_table(runs: List[Dict[str, Any]]) -> List[str]:
    """Peak RSS increase of each measured call, one column per (model, N): does it grow with N?"""
    header = [f"{run['model']} N = {run['N']:,}" for run in runs]
    lines = ["", "Memory (MiB) by N: the peak RSS increase of each call over the resident memory at its start, "
             "`memory_estimate()` (factors kept after the fit / per-batch tensors of a pass), the process's peak "
             "RSS and its RSS before the model was built.", "",
             "| | " + " | ".join(header) + " |", "|---|" + "---|" * len(runs)]
    steps = [row["step"] for row in runs[0]["rows"] if np.isfinite(row["peak_mib"]) and row["kind"] != "profile"]
    for step in steps:
        values = [next((row["peak_mib"] for row in run["rows"] if row["step"] == step), float("nan")) for run in runs]
        lines.append(f"| {step.strip()} | " + " | ".join(_fmt(value, 1) for value in values) + " |")
    for label, values in (
            ("`memory_estimate().factors`", [run["memory_estimate"]["factors"] / 2 ** 20 for run in runs]),
            ("`memory_estimate().batch`", [run["memory_estimate"]["batch"] / 2 ** 20 for run in runs]),
            ("process peak RSS", [run["process_peak_mib"] for run in runs]),
            ("RSS at start (TensorFlow imported)", [run["start_rss_mib"] for run in runs])):
        lines.append(f"| {label} | " + " | ".join(_fmt(value, 1) for value in values) + " |")
    return lines


def _coverage_tables(runs: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    seen = set()
    for run in runs:
        if run["model"] in seen:
            continue
        seen.add(run["model"])
        cover = run["coverage"]
        lines += ["", f"Coverage, {run['model']}: {len(cover['blocks'])} Kronecker blocks, "
                  f"{cover['covered_params']:,} parameters; left out: {len(cover['skipped'])} weights, "
                  f"{cover['skipped_params']:,} parameters.", "",
                  "| block (kernel) | type | rows of A | out (S) | parameters |", "|---|---|---|---|---|"]
        for block in cover["blocks"]:
            rows_text = (f"{block['rows']}{' (diagonal)' if block['diagonal A'] else ''}"
                         f"{' (bias row)' if block['bias'] else ''}")
            lines.append(f"| `{block['kernel']}` | {block['type']} | {rows_text} | {block['out']} | "
                         f"{block['params']:,} |")
        if cover["skipped"]:
            lines += ["", "Left out: " + ", ".join(f"`{weight['weight']}` ({weight['params']:,})"
                                                   for weight in cover["skipped"]) + "."]
            lines += ["", "Reasons logged: " + " ".join(dict.fromkeys(cover["reasons"]))]
    return lines


def markdown(runs: List[Dict[str, Any]], batch_size: int) -> str:
    """The report: one table of every step, the memory comparison by N, the coverage of each model."""
    return "\n".join(_step_table(runs, batch_size) + _memory_table(runs) + _coverage_tables(runs)) + "\n"


def main() -> None:
    """Command line: one subprocess per (model, N), then the table and the result files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="dataset sizes of the CNN")
    parser.add_argument("--transformer-sizes", type=int, nargs="+", default=None,
                        help="dataset sizes of the transformer (default: those of the CNN)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tests", type=int, default=100, help="test samples of the pairwise matrix")
    parser.add_argument("--repeats", type=int, default=2, help="plain epochs measured (the fastest is the unit)")
    parser.add_argument("--models", nargs="+", default=["resnet", "transformer"], choices=["resnet", "transformer"])
    parser.add_argument("--no-profile", action="store_true", help="skip the profile rows")
    parser.add_argument("--output-dir", default=RESULTS, help="where kfac_scale.md and .json are written")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = run_child(args.child[0], int(args.child[1]), args.batch_size, args.tests, args.repeats,
                           not args.no_profile)
        print("RESULT " + json.dumps(result, default=float), flush=True)
        return
    sizes = args.sizes or ([1000] if args.quick else [1000, 10000])
    runs = []
    for model_name in args.models:
        for count in (sizes if model_name == "resnet" else args.transformer_sizes or sizes):
            result = run_in_subprocess(model_name, count, args)
            if result is not None:
                runs.append(result)
    if not runs:
        sys.exit(1)
    report = markdown(runs, args.batch_size)
    print(report)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "kfac_scale.md"), "w", encoding="utf-8") as handle:
        handle.write("# K-FAC / EK-FAC at scale (`benchmarks/bench_kfac_scale.py`)\n\n" + report)
    with open(os.path.join(args.output_dir, "kfac_scale.json"), "w", encoding="utf-8") as handle:
        json.dump(runs, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
