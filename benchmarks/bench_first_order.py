"""Performance of first-order influence functions on a digits MLP 64-32-10 with every layer watched.

Setting: scikit-learn's bundled ``load_digits`` (pixels scaled to [0, 1]) shuffled with a seeded generator;
the first 1,437 samples are the training set, the next 100 the test set. A Sequential
``keras.Input((64,)) -> Dense(32, relu) -> Dense(10)`` (logits) is trained briefly with Adam, then wrapped as
``InfluenceModel(model, start_layer=0, last_layer=-1, ...)``: both layers are watched, P = 2,410. Solvers use
``λ = 0.1`` (``ExactIHVP(..., regularization=0.1)``).

Stages (each run once untimed-for-the-median as a warm-up that includes tracing, then ``--repeats`` times):

(a) per-sample gradients of the training set, ``influence_model.batch_jacobian(train_ds)``, against a plain
    compiled forward + backward pass of the summed loss of each batch over the same data (the practical lower
    bound: the same arithmetic without keeping one gradient per sample); their ratio is printed;
(b) ``ExactIHVP`` construction (mean Hessian + factorisation), with its two parts measured separately;
(c) all-pairs influence, ``calculator.estimate_influence_values_matrix(test_ds, train_ds)`` (100 x 1,437);
(d) self-influence of every training sample (``compute_influence_values``, concatenated);
(e) ``top_k(test_ds, train_ds, k=10)``, fully iterated;
plus two ``ConjugateGradientDescentIHVP(regularization=0.1)`` rows: construction, all-pairs time and the largest
deviation of its influence matrix from the exact one, relative to the largest exact value.

Memory: the increase of the resident set size during a stage (warm-up and repeats) over its value at the start of
the stage. On Linux the peak is reset before each stage (``/proc/self/clear_refs``) and read from ``VmHWM``;
elsewhere the column shows the growth of ``ru_maxrss`` (the peak of the whole process, so later stages often show
0). TensorFlow's allocator keeps freed buffers for reuse, so a stage that reuses buffers of an earlier one shows
less than it allocates: read the column as "new memory this stage needed", not as its working set.

Usage: ``python benchmarks/bench_first_order.py [--repeats 3] [--batch-size 128] [--seed 0]``. Timings on a
shared machine vary; the 1-minute load average is printed with the results.
"""
import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

# pylint cannot see the editable install's namespace package from this folder (no __init__.py here).
from deel.influenciae.benchmark.digits import (build_mlp,  # pylint: disable=no-name-in-module
                                               load_digits_split, one_hot, train_classifier)
from deel.influenciae.common import (ConjugateGradientDescentIHVP,  # pylint: disable=no-name-in-module
                                     ExactIHVP, InfluenceModel)
from deel.influenciae.influence import FirstOrderInfluenceCalculator  # pylint: disable=no-name-in-module
from deel.influenciae.utils.sorted_dict import ORDER  # pylint: disable=no-name-in-module
from bench_common import PeakMemory, plain_step, ru_maxrss_kib  # pylint: disable=C0411

N_TRAIN = 1437
N_TEST = 100
REGULARIZATION = 0.1
TOP_K = 10
TRAIN_EPOCHS = 30
KIB = 1024


# -------- Measurement -------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """Timings (seconds) and memory growth of one benchmarked stage."""

    name: str
    first_s: float
    times_s: List[float] = field(default_factory=list)
    peak_mib: float = 0.0
    note: str = ""

    @property
    def median_s(self) -> float:
        """Median of the timed repeats."""
        return statistics.median(self.times_s)


def _materialize(result: Any) -> Any:
    """Force the computation of eager results (tensors to numpy) so that timings cover all the work."""
    return tf.nest.map_structure(lambda item: item.numpy() if hasattr(item, "numpy") else item, result)


def measure(name: str, function: Callable[[], Any], repeats: int, note: str = "") -> Tuple[StageResult, Any]:
    """Run ``function`` once (warm-up, includes tracing) then ``repeats`` times; return timings and last result."""
    with PeakMemory() as memory:
        tick = time.perf_counter()
        result = _materialize(function())
        stage = StageResult(name, time.perf_counter() - tick, note=note)
        for _ in range(repeats):
            result = None  # free the previous result first, so that it does not add to the peak
            tick = time.perf_counter()
            result = _materialize(function())
            stage.times_s.append(time.perf_counter() - tick)
    stage.peak_mib = memory.delta_mib
    return stage, result


# -------- Set-up ------------------------------------------------------------------------------------------------
def make_data(seed: int) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """Digits (N, 64) in [0, 1] with one-hot labels: ``(x_train, y_train), (x_test, y_test)``, seeded shuffle."""
    split = load_digits_split(seed, n_train=N_TRAIN, n_test=N_TEST, test_first=False)
    return (split.x_train, one_hot(split.y_train)), (split.x_test, one_hot(split.y_test))


def make_model(x_train: np.ndarray, y_train: np.ndarray) -> keras.Model:
    """The MLP 64-32-10 (logits), trained for a few epochs so that the Hessian is that of a fitted model."""
    model = build_mlp(hidden_units=32)
    train_classifier(model, x_train, y_train, TRAIN_EPOCHS, batch_size=64, learning_rate=1e-2)
    return model


def plain_gradient_pass(model: keras.Model, loss_function: Callable, dataset: tf.data.Dataset
                        ) -> Callable[[], List[tf.Tensor]]:
    """A compiled forward + backward pass of each batch's summed loss w.r.t. all trainable weights.

    Returns a function iterating over ``dataset`` like ``batch_jacobian`` does, returning one flat (P,) gradient
    per batch: the cost of the same data through the same network without per-sample gradients.
    """
    step = plain_step(model, loss_function)
    return lambda: [step(inputs, targets) for inputs, targets in dataset]


# -------- Report ------------------------------------------------------------------------------------------------
def print_table(stages: Sequence[StageResult]) -> None:
    """Print the stages as a fixed-width table."""
    header = f"{'stage':<58}{'first (s)':>10}{'median (s)':>12}{'min (s)':>10}{'peak ΔRSS (MiB)':>17}  note"
    print(header)
    print("-" * len(header))
    for stage in stages:
        print(f"{stage.name:<58}{stage.first_s:>10.3f}{stage.median_s:>12.3f}{min(stage.times_s):>10.3f}"
              f"{stage.peak_mib:>17.1f}  {stage.note}")


def run(repeats: int, batch_size: int, seed: int) -> Dict[str, Any]:
    """Run every stage and print the table; return the raw results.

    Parameters
    ----------
    repeats
        Timed repeats per stage (after one warm-up run).
    batch_size
        Batch size of the training and test datasets.
    seed
        Seed of the shuffle and of the model's initialisation and training.
    """
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = make_data(seed)
    model = make_model(x_train, y_train)
    loss_function = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss_function)
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(batch_size)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(batch_size)
    n_params = influence_model.nb_params
    print(f"MLP 64-32-10, every layer watched: P = {n_params}; {N_TRAIN} train x {N_TEST} test; batch size "
          f"{batch_size}; λ = {REGULARIZATION}; {repeats} repeats after one warm-up")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min) at start\n")

    stages: List[StageResult] = []
    stage, jacobian = measure("(a) per-sample gradients, batch_jacobian(train) (N, P)",
                              lambda: influence_model.batch_jacobian(train_ds), repeats)
    stages.append(stage)
    plain, per_batch = measure("    plain forward+backward, summed loss per batch",
                               plain_gradient_pass(model, loss_function, train_ds), repeats)
    stages.append(plain)
    summed_rows = sum(float(np.abs(row).max()) for row in per_batch)
    check = float(np.abs(jacobian.sum(axis=0) - np.sum(per_batch, axis=0)).max()) / max(summed_rows, 1e-30)
    stage.note = f"{stage.median_s / plain.median_s:.1f}x the plain pass; Σ rows vs plain: rel. err {check:.1e}"

    stage, ihvp = measure("(b) ExactIHVP construction (Hessian + factorisation)",
                          lambda: ExactIHVP(influence_model, train_ds, regularization=REGULARIZATION), repeats)
    stages.append(stage)
    hessian_stage, _ = measure("    of which: mean Hessian (batch_hessian_tensor, 512/batch)",
                               lambda: [influence_model.batch_hessian_tensor(batch)
                                        for batch in train_ds.rebatch(512)], repeats)
    stages.append(hessian_stage)
    hessian64 = tf.cast(ihvp.hessian, tf.float64)
    eigh_stage, _ = measure("    of which: tf.linalg.eigh of the float64 P x P Hessian",
                            lambda: tf.linalg.eigh(hessian64), repeats)
    stages.append(eigh_stage)
    eigenvalues = ihvp.eigenvalues.numpy()
    stage.note = f"eigenvalues in [{eigenvalues.min():.2g}, {eigenvalues.max():.3g}]"

    calculator = FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)
    stage, exact_matrix = measure("(c) all-pairs influence, estimate_influence_values_matrix",
                                  lambda: calculator.estimate_influence_values_matrix(test_ds, train_ds), repeats,
                                  note=f"matrix {N_TEST} x {N_TRAIN}")
    stages.append(stage)

    def self_influence() -> tf.Tensor:
        return tf.concat([values for _, values in calculator.compute_influence_values(train_ds)], axis=0)

    stage, _ = measure("(d) self-influence of every training sample", self_influence, repeats)
    stages.append(stage)

    def top_k() -> List[Any]:
        return [(values, samples) for _, values, samples in calculator.top_k(test_ds, train_ds, k=TOP_K,
                                                                                order=ORDER.DESCENDING)]

    stage, _ = measure(f"(e) top_k(test, train, k={TOP_K})", top_k, repeats)
    stages.append(stage)

    def cg_calculator() -> FirstOrderInfluenceCalculator:
        cg = ConjugateGradientDescentIHVP(influence_model, train_dataset=train_ds, regularization=REGULARIZATION)
        return FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=cg)

    stage, cg_calc = measure("CG (λ = 0.1): ConjugateGradientDescentIHVP construction", cg_calculator, repeats)
    stages.append(stage)
    stage, cg_matrix = measure("CG (λ = 0.1): all-pairs influence (same calculator)",
                               lambda: cg_calc.estimate_influence_values_matrix(test_ds, train_ds), repeats)
    scale = float(np.abs(exact_matrix).max())
    deviation = float(np.abs(cg_matrix - exact_matrix).max()) / scale
    frobenius = float(np.linalg.norm(cg_matrix - exact_matrix) / np.linalg.norm(exact_matrix))
    stage.note = f"max |CG - exact| / max |exact| = {deviation:.1e}; Frobenius rel. {frobenius:.1e}"
    stages.append(stage)

    print_table(stages)
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min) at the end; peak RSS of the process "
          f"{ru_maxrss_kib() / KIB:.0f} MiB")
    return {"n_params": n_params, "stages": stages, "cg_max_relative_deviation": deviation}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per stage (default 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the datasets (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1")
    run(args.repeats, args.batch_size, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
