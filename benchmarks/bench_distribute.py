"""Data parallelism with ``tf.distribute``: per-sample gradients, TracIn self-influence and the EK-FAC fit with one
replica (no strategy) and with two replicas (``MirroredStrategy`` over two logical CPU devices), in the same process,
as ratios to one plain forward+backward epoch.

The CPU is split into two logical devices before TensorFlow starts (``CPU:0`` and ``CPU:1``). For each model of
``bench_real_models`` (the ResNet-style CNN, ~0.33 M parameters; with ``--models``, the small transformer) on
synthetic data (N samples, batch 128), weights as initialised, all weights watched:

* the plain compiled forward + backward epoch (``bench_common.plain_step``, traced first, best of ``--repeats``
  and at least 2): the unit of the ratios, measured on one device, and again at the end (the machine's drift);
* **per-sample gradients**: the whole ``(N, P)`` Jacobian does not fit in memory for the ResNet (N × P floats), so
  the timed pass is ``Executor(strategy=...).sum(lambda batch: reduce_sum(square(batch_jacobian_tensor(batch)),
  axis=0), train)``: every sample's flat gradient is computed (on its replica) and reduced at once to the ``(P,)``
  sum of squared per-sample gradients (the diagonal of the empirical Fisher times N), all-reduced across replicas;
* **TracIn self-influence**: ``TracIn([influence_model], [1.0]).self_influence(train)`` (the factored per-layer
  products; ``(N,)`` values gathered from the replicas in the dataset's order), one ``TracIn`` per configuration
  reused by its warm-up and measured passes (its compiled products belong to the object);
* **EK-FAC fit**: ``EKFACIHVP(influence_model, train, regularization=1e-3, unsupported_layers="skip",
  fit_now=False).fit()``, a fresh solver for every fit (its compiled passes are kept with the influence model, so
  the warm-up traces them once): two passes over the data, the covariances and the corrected eigenvalues, each
  summed across replicas; the eigendecompositions in between run on the host.

Each configuration (1 replica: ``InfluenceModel(..., strategy=None)``; 2 replicas: ``strategy=MirroredStrategy``)
first runs every method on a full batch and the short last batch: the warm-up (mostly tracing, per configuration:
each replica traces its own functions), reported apart and excluded from the timings. The measured passes then
alternate between the configurations (``--repeats`` rounds, the fastest kept). Reported: wall and CPU seconds
(CPU time of the process, all threads: less sensitive to the other jobs of a shared machine), × the plain epoch,
samples per second, the speed-up of 2 replicas (1-replica seconds / 2-replica seconds) and the largest relative
difference ``max|a - b| / max|b|`` between the 2-replica results and the 1-replica ones (EK-FAC: the covariance sums
and the quadratic forms ``gᵀ (F + λI)⁻¹ g`` of 16 per-sample gradients, both independent of the eigenvectors' signs).

An honest note: on this machine both logical devices share the same 2 physical cores (and TensorFlow's intra-op
thread pool), so 2 replicas cannot be faster than one device using both cores through intra-op parallelism. What is
measured here is the overhead of the split (an eager ``strategy.run`` per global batch, two half-size batches
instead of one, the gather / all-reduce of the results) and that the results are the same. On several GPUs or hosts
each replica has its own device and the passes split the work between them.

Usage: ``.venv/bin/python benchmarks/bench_distribute.py [--models resnet transformer] [--samples N]``; prints a
Markdown table and writes it to ``benchmarks/results/distribute.md`` (``--output``).
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

LOGICAL_CPUS = 2


def split_cpu(count: int = LOGICAL_CPUS) -> None:
    """Split the first physical CPU into ``count`` logical devices; must run before TensorFlow's runtime starts
    (before any TensorFlow op)."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:  # the runtime had started: checked in main()
        print(f"could not split the CPU: {error}", file=sys.stderr)


split_cpu()

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position,C0413
from bench_common import plain_step  # noqa: E402
from bench_real_models import LOSS, measure, resnet, synthetic, transformer  # noqa: E402
from deel.influenciae.common import EKFACIHVP, Executor, InfluenceModel  # noqa: E402
from deel.influenciae.trac_in import TracIn  # noqa: E402

# pylint: enable=wrong-import-position,C0413

RESULTS = Path(__file__).resolve().parent / "results"
PROBES = 16  # per-sample gradients whose EK-FAC quadratic forms are compared


class OnceFilter(logging.Filter):  # pylint: disable=too-few-public-methods
    """Let each distinct log message through once (EK-FAC names the weights it leaves out at every fit)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class Method(NamedTuple):
    """One measured method: ``prepare(influence_model)`` builds what a configuration reuses for its warm-up and
    measured passes (a calculator keeps its compiled functions); ``timed(prepared, dataset)`` is the measured call
    (its result kept); ``values(result)`` the array compared across configurations (not timed)."""

    name: str
    prepare: Callable[[Any], Any]
    timed: Callable[[Any, tf.data.Dataset], Any]
    values: Callable[[Any], np.ndarray]


def timed_call(function: Callable[[], Any]) -> Dict[str, Any]:
    """``bench_real_models.measure`` (wall seconds, peak RSS increase) with the process's CPU seconds and the
    call's result (``result``)."""
    kept: Dict[str, Any] = {}
    cpu = time.process_time()
    timing = measure(lambda: kept.setdefault("result", function()))
    timing["cpu_seconds"] = time.process_time() - cpu
    timing["result"] = kept.get("result")
    return timing


def relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """``max|values - reference| / max|reference|`` (the absolute difference when the reference is all zeros)."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    if values.shape != reference.shape:
        return float("inf")
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    difference = float(np.max(np.abs(values - reference))) if reference.size else 0.0
    return difference / scale if scale > 0 else difference


def methods(probes: tf.Tensor) -> List[Method]:
    """The three measured methods; ``probes`` (P, K) are the per-sample gradients of the EK-FAC check."""

    def squared_gradients(influence_model: Any) -> Callable[[tf.data.Dataset], np.ndarray]:
        executor = Executor(verbose=False, strategy=influence_model.strategy)

        def reduce_batch(batch: tuple) -> tf.Tensor:
            return tf.reduce_sum(tf.square(influence_model.batch_jacobian_tensor(batch)), axis=0)

        return lambda dataset: executor.sum(reduce_batch, dataset, name="train")[0].numpy()

    def ekfac_fit(influence_model: Any, dataset: tf.data.Dataset) -> EKFACIHVP:
        # A fresh solver every time; its compiled passes are kept with the influence model (traced once).
        solver = EKFACIHVP(influence_model, dataset, regularization=1e-3, unsupported_layers="skip", verbose=False,
                           fit_now=False)
        solver.fit()
        return solver

    def ekfac_values(solver: EKFACIHVP) -> np.ndarray:
        sums = [np.ravel(solver.state[str(index)][field]) for index in range(len(solver.blocks))
                for field in ("activation_sum", "gradient_sum")]
        covariances = np.concatenate(sums)
        quadratic = solver.quadratic_form(probes).numpy()
        # Two parts of different scales: each normalised by its own largest magnitude before they are joined.
        return np.concatenate([covariances / max(np.max(np.abs(covariances)), 1e-30),
                               quadratic / max(np.max(np.abs(quadratic)), 1e-30)])

    def same(result: np.ndarray) -> np.ndarray:
        return result

    return [Method("per-sample gradients (Σ g²)", squared_gradients, lambda summed, dataset: summed(dataset), same),
            Method("TracIn self-influence", lambda influence_model: TracIn([influence_model], [1.0]),
                   lambda tracin, dataset: tracin.self_influence(dataset).numpy(), same),
            Method("EK-FAC fit", lambda influence_model: influence_model, ekfac_fit, ekfac_values)]


def _row(model_name: str, count: int, size: int, step: str, replicas: int, timing: Dict[str, Any],
         baseline: Dict[str, float]) -> Dict[str, Any]:
    return {"model": model_name, "N": count, "P": size, "step": step, "replicas": replicas,
            "seconds": timing["seconds"], "cpu_seconds": timing["cpu_seconds"],
            "epochs": timing["seconds"] / baseline["seconds"], "cpu_epochs": timing["cpu_seconds"] /
            baseline["cpu_seconds"], "samples_per_second": count / timing["seconds"],
            "peak_mib": timing.get("peak_mib", float("nan")), "warm_up_seconds": timing.get("warm_up_seconds"),
            "speed_up": None, "difference": None}


def run(model_name: str, count: int, batch_size: int, repeats: int) -> List[Dict[str, Any]]:
    """Every method with 1 and 2 replicas on one model: the rows of the table."""
    # pylint: disable=too-many-locals
    model = resnet() if model_name == "resnet" else transformer()
    inputs, labels = synthetic(model_name, count, 1)
    train = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)
    batches = int(train.cardinality())
    first = train.take(1).concatenate(train.skip(batches - 1))  # warm-up: a full batch and the short last one
    step = plain_step(model, LOSS)

    def epoch():
        for batch_inputs, targets in train:
            step(batch_inputs, targets).numpy()

    epoch()  # trace
    baseline = min((timed_call(epoch) for _ in range(max(repeats, 2))), key=lambda timing: timing["seconds"])
    configurations = {1: None, 2: tf.distribute.MirroredStrategy([f"CPU:{index}" for index in range(LOGICAL_CPUS)])}
    models = {replicas: InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS, strategy=strategy)
              for replicas, strategy in configurations.items()}
    size = models[1].nb_params
    probes = tf.transpose(models[1].batch_jacobian_tensor(tuple(tensor[:PROBES] for tensor in next(iter(train)))))
    print(f"{model_name}: N = {count}, P = {size:,}, batch {batch_size}, {batches} batches; plain epoch "
          f"{baseline['seconds']:.2f} s (CPU {baseline['cpu_seconds']:.2f} s); replicas of the 2-replica strategy: "
          f"{configurations[2].extended.worker_devices}", flush=True)
    rows = [_row(model_name, count, size, "plain forward+backward epoch", 1, baseline, baseline)]
    for method in methods(probes):
        prepared = {replicas: method.prepare(influence_model) for replicas, influence_model in models.items()}
        warm = {replicas: timed_call(lambda calculator=calculator, method=method: method.timed(calculator, first))
                for replicas, calculator in prepared.items()}
        best: Dict[int, Optional[Dict[str, Any]]] = {replicas: None for replicas in models}
        for _ in range(repeats):  # alternate the configurations: the machine's drift hits both alike
            for replicas, calculator in prepared.items():
                timing = timed_call(lambda calculator=calculator, method=method: method.timed(calculator, train))
                if best[replicas] is None or timing["seconds"] < best[replicas]["seconds"]:
                    best[replicas] = timing
        values = {replicas: method.values(best[replicas]["result"]) for replicas in models}
        for replicas, timing in best.items():
            timing["warm_up_seconds"] = warm[replicas]["seconds"]
            row = _row(model_name, count, size, method.name, replicas, timing, baseline)
            if replicas > 1:
                row["speed_up"] = best[1]["seconds"] / timing["seconds"]
                row["difference"] = relative_difference(values[replicas], values[1])
            rows.append(row)
            extra = (f", speed-up {row['speed_up']:.2f}, max rel. diff {row['difference']:.1e}"
                     if replicas > 1 else "")
            print(f"  {method.name:28s} {replicas} replica{'s' if replicas > 1 else ' '} {row['seconds']:8.2f} s = "
                  f"{row['epochs']:6.2f} epochs (CPU {row['cpu_epochs']:6.2f}), {row['samples_per_second']:7.0f} "
                  f"samples/s, warm-up {row['warm_up_seconds']:.1f} s{extra}", flush=True)
    check = min((timed_call(epoch) for _ in range(max(repeats, 2))), key=lambda timing: timing["seconds"])
    rows.append(_row(model_name, count, size, "plain epoch again, at the end (machine noise)", 1, check, baseline))
    print(f"  plain epoch again, at the end (machine noise): {check['seconds']:.2f} s", flush=True)
    return rows


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


def markdown(rows: List[Dict[str, Any]], batch_size: int, loads: List[float]) -> str:
    """The report: one row per (model, step, replicas)."""
    lines = ["# tf.distribute: 1 replica vs 2 (`benchmarks/bench_distribute.py`)", "",
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores split into {LOGICAL_CPUS} logical devices "
             f"(`MirroredStrategy(['CPU:0', 'CPU:1'])` for 2 replicas, no strategy for 1); batch {batch_size}. "
             "Both logical devices share the same physical cores: the 2-replica rows measure the overhead of the "
             "split, not a gain (see the script's docstring). Seconds (wall; best of the measured passes, after a "
             "warm-up on a full and the short last batch reported apart), × one plain forward+backward epoch of the "
             "same process (wall; and CPU time of the process), samples per second, speed-up = 1-replica seconds / "
             "2-replica seconds, and max|a − b| / max|b| of the 2-replica results against the 1-replica ones. "
             f"Load average (1 min) at the start and end: {loads[0]:.1f} → {loads[1]:.1f}.", "",
             "| model | N | P | step | replicas | warm-up (s) | seconds | × epoch | × epoch (CPU) | samples/s | "
             "speed-up (2 vs 1) | max rel. diff (2 vs 1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        difference = "-" if row["difference"] is None else f"{row['difference']:.1e}"
        lines.append(f"| {row['model']} | {row['N']:,} | {row['P']:,} | {row['step']} | {row['replicas']} | "
                     f"{_fmt(row['warm_up_seconds'], 1)} | {_fmt(row['seconds'])} | {_fmt(row['epochs'])} | "
                     f"{_fmt(row['cpu_epochs'])} | {_fmt(row['samples_per_second'], 0)} | {_fmt(row['speed_up'])} | "
                     f"{difference} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line: every model asked for, then the table (printed and written)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--models", nargs="+", default=["resnet"], choices=["resnet", "transformer"])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="measured passes per configuration (fastest kept)")
    parser.add_argument("--output", default=str(RESULTS / "distribute.md"), help="where the table is written")
    args = parser.parse_args()
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < LOGICAL_CPUS:
        sys.exit(f"{LOGICAL_CPUS} logical CPU devices are needed, found {len(devices)}.")
    logging.getLogger("deel.influenciae").addFilter(OnceFilter())
    load_start = os.getloadavg()[0]
    rows: List[Dict[str, Any]] = []
    for model_name in args.models:
        rows += run(model_name, args.samples, args.batch_size, args.repeats)
    report = markdown(rows, args.batch_size, [load_start, os.getloadavg()[0]])
    print(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    print(f"written to {output}")


if __name__ == "__main__":
    main()
