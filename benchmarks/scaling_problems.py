"""Settings, probes and problems of ``bench_scaling.py``: memory and timing helpers, the synthetic and digits data,
the MLP and CNN, one measurement point (:class:`Problem`) and the two gradient passes compared."""
import math
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Tuple

import keras
import numpy as np
import tensorflow as tf

# pylint cannot see the editable install's namespace package from this folder (no __init__.py here).
from deel.influenciae.benchmark.digits import build_mlp as build_digits_mlp  # pylint: disable=no-name-in-module
from deel.influenciae.benchmark.digits import load_digits_arrays, train_classifier  # pylint: disable=E0611
from deel.influenciae.common import InfluenceModel  # pylint: disable=no-name-in-module
from bench_common import proc_status_kib, ru_maxrss_kib  # pylint: disable=C0411

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
    """scikit-learn's bundled digits (offline): inputs (1797, 64) in [0, 1], integer labels (int32)."""
    inputs, labels = load_digits_arrays()
    return inputs, labels.astype(np.int32)


def per_sample_loss() -> keras.losses.Loss:
    """The un-reduced loss every benchmark uses."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def build_mlp(hidden: int, seed: int) -> keras.Model:
    """``Input(64) -> Dense(hidden, relu) -> Dense(10)`` (logits), seeded initialisation."""
    return build_digits_mlp((INPUT_DIM,), hidden, NB_CLASSES, seed=seed)


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
    where ``H + 0.1 I`` is indefinite (the Ritz value measured is in ``benchmarks/README.md``)."""
    return 1e-2 * min(1.0, math.sqrt(N_SWEEP_HIDDEN / hidden))


def train(model: keras.Model, inputs: np.ndarray, labels: np.ndarray, epochs: int, rate: float = 1e-2
          ) -> keras.Model:
    """A short, seeded training with Adam so that the Hessian is that of a (partly) fitted model."""
    train_classifier(model, inputs, labels, epochs, batch_size=128, learning_rate=rate, shuffle=False)
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
