"""Run the methods of the library on one model of the zoo and compare them with brute-force ground truths.

Usage: ``python tests/zoo/zoo_case.py MODEL [METHOD ...]`` (all of :data:`~tests.zoo.zoo_models.METHODS` by
default). Runs in its own process (``test_zoo.py`` starts it), so that a crash of TensorFlow fails the model's
tests instead of the test session. Before each method it prints ``ZOO-START <method>`` and after it one line
``ZOO-RESULT <json>``::

    {"method": str, "seconds": float, "error": str or None, "traceback": str or None, "warnings": [str],
     "checks": [{"name": str, "error": float, "scale": float, "tol": float, "problem": str or None}],
     "not_applicable": bool}

A check passes when ``error <= tol * scale`` (``error``: max absolute difference, ``scale``: max absolute expected
value) and ``problem`` is None (a shape mismatch or a non-finite value).

The ground truths never call the library: per-sample gradients come from one ``tf.GradientTape`` per sample
through ``model(x, training=False)``; the mean Hessian is the Jacobian of the gradient of the summed training
loss (nested tapes on the Keras variables); solves, RPS-L2's ridge regression and RPS-LJE's derivation are float64
NumPy.
"""
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# pylint: disable=wrong-import-position
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from deel.influenciae.common import (BaseInfluenceModel, ConjugateGradientDescentIHVP, ExactIHVP,  # noqa: E402
                                     ExactIHVPFactory, InfluenceModel, LissaIHVP)
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator  # noqa: E402
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE  # noqa: E402
from deel.influenciae.trac_in import TracIn  # noqa: E402
from tests.zoo.zoo_models import BUILDERS, METHODS, NOT_APPLICABLE, ZooModel  # noqa: E402

N_TRAIN, N_TEST = 20, 6
TRAIN_BATCH, TEST_BATCH = 8, 4  # 8 + 8 + 4 and 4 + 2: short last batches on both sides
LEARNING_RATES = (0.1, 0.05)  # two TracIn checkpoints
RPS_L2_LAMBDA = 1e-2
LJE_ETA = 1e-4  # RepresenterPointLJE's default perturbation_lr

# Relative tolerances (max |error| / max |expected|) per precision and method.
TOLERANCES: Dict[str, Dict[str, float]] = {
    "float32": {"gradients": 1e-4, "tracin": 1e-4, "exact": 1e-3, "cg": 1e-3, "lissa": 1e-3, "arnoldi": 5e-3,
                "rps_l2": 1e-3, "rps_lje": 1e-3},
    "float64": {"gradients": 1e-9, "tracin": 1e-9, "exact": 1e-8, "cg": 1e-7, "lissa": 1e-7, "arnoldi": 1e-7,
                "rps_l2": 1e-6, "rps_lje": 1e-7},
    # bfloat16 activations (8 bits of mantissa): library and tapes round differently.
    "bfloat16": {"gradients": 3e-2, "tracin": 3e-2, "exact": 5e-2, "cg": 5e-2, "lissa": 5e-2, "arnoldi": 5e-2,
                 "rps_l2": 5e-2, "rps_lje": 5e-2},
}
CG_TOL = {"float32": 1e-6, "float64": 1e-12, "bfloat16": 1e-5}
# LiSSA's error decays like (1 - μ/s)ⁿ with μ/s >= 0.25 / 1.5 here.
LISSA_ITERATIONS = {"float32": 80, "float64": 150, "bfloat16": 60}


def _take(inputs: Any, start: int, stop: int) -> Any:
    return tf.nest.map_structure(lambda array: array[start:stop], inputs)


def _batched(inputs: Any, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)


def _layer_index(model: keras.Model, layer: Any) -> int:
    if isinstance(layer, str):
        return [candidate.name for candidate in model.layers].index(layer)
    return layer + len(model.layers) if layer < 0 else layer


def watched_variables(zoo: ZooModel, model: keras.Model) -> List[Any]:
    """Trainable weights of the watched layer range, in layer order (the documented order of the gradients)."""
    start = _layer_index(model, zoo.start_layer)
    last = start if zoo.last_layer is None else _layer_index(model, zoo.last_layer)
    return [variable for layer in model.layers[start:last + 1] for variable in layer.trainable_weights]


def tape_gradients(zoo: ZooModel, model: keras.Model, variables: Sequence[Any], inputs: Any,
                   labels: np.ndarray) -> np.ndarray:
    """One tape per sample: gradients of its loss w.r.t. ``variables``, flattened row-major: (N, P) float64.

    The per-sample function is compiled (one trace, since every call sees one sample) but holds no batch dimension
    to vectorize over: it is the plain loop of tapes the library's vectorized kernels must reproduce."""
    variables = list(variables)

    @tf.function
    def one_sample(sample_inputs, sample_labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(zoo.loss(sample_labels, model(sample_inputs, training=False)))
        gradients = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.convert_to_tensor(gradient) for gradient in gradients]

    rows = []
    for index in range(len(labels)):
        gradients = one_sample(_take(inputs, index, index + 1), labels[index:index + 1])
        rows.append(np.concatenate([np.asarray(gradient, np.float64).ravel() for gradient in gradients]))
    return np.stack(rows)


def tape_hessian(zoo: ZooModel, model: keras.Model, variables: Sequence[Any], inputs: Any,
                 labels: np.ndarray) -> np.ndarray:
    """Mean Hessian of the training loss w.r.t. ``variables``: Jacobian of the gradient of the summed loss (nested
    tapes), in the model's precision, returned as float64 (P, P)."""
    variables = list(variables)

    @tf.function
    def summed_hessian(batch_inputs, batch_labels):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(zoo.loss(batch_labels, model(batch_inputs, training=False)))
            gradients = inner.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in gradients], axis=0)
        blocks = outer.jacobian(flat, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                experimental_use_pfor=False)
        return tf.concat([tf.reshape(block, [tf.shape(flat)[0], -1]) for block in blocks], axis=1)

    hessian = summed_hessian(inputs, labels).numpy().astype(np.float64) / len(labels)
    return (hessian + hessian.T) / 2


class Case:  # pylint: disable=too-many-instance-attributes
    """One zoo model, its data and its ground truths (computed on first use and kept)."""

    def __init__(self, name: str):
        self.name = name
        self.zoo = BUILDERS[name](0)
        self.model = self.zoo.model
        self.x_train, self.y_train = self.zoo.data(N_TRAIN, 1)
        self.x_test, self.y_test = self.zoo.data(N_TEST, 2)
        self.train = _batched(self.x_train, self.y_train, TRAIN_BATCH)
        self.test = _batched(self.x_test, self.y_test, TEST_BATCH)
        self.tolerances = TOLERANCES[self.zoo.precision]
        self.variables = watched_variables(self.zoo, self.model)
        self._cache: Dict[str, Any] = {}

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` on first use of ``key``, then the kept value."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def influence_model(self, model: Optional[keras.Model] = None) -> InfluenceModel:
        """The library's view of the watched layers."""
        return InfluenceModel(model or self.model, start_layer=self.zoo.start_layer, last_layer=self.zoo.last_layer,
                              loss_function=self.zoo.loss)

    # Ground truths ------------------------------------------------------------------------------
    def gradients(self, side: str) -> np.ndarray:
        """Per-sample gradients of the watched weights, ``side`` = "train" or "test": (N, P)."""
        inputs, labels = (self.x_train, self.y_train) if side == "train" else (self.x_test, self.y_test)
        return self.cached(f"g_{side}", lambda: tape_gradients(self.zoo, self.model, self.variables, inputs, labels))

    def hessian(self) -> Tuple[np.ndarray, float, np.ndarray]:
        """Mean Hessian (P, P), the damping λ used by every solver, and the eigenvalues of H."""
        def compute():
            hessian = tape_hessian(self.zoo, self.model, self.variables, self.x_train, self.y_train)
            eigenvalues = np.linalg.eigvalsh(hessian)
            # H + λI positive definite with a condition number below 6 (CG, LiSSA and Arnoldi converge fast).
            damping = 0.25 * np.abs(eigenvalues).max() + max(0.0, -eigenvalues.min())
            return hessian, float(damping), eigenvalues
        return self.cached("hessian", compute)

    def influence(self) -> Tuple[np.ndarray, np.ndarray]:
        """``g(t)ᵀ (H + λI)⁻¹ g(z)`` (N_test, N_train) and the self-influence ``g(z)ᵀ (H + λI)⁻¹ g(z)`` (N_train,)."""
        def compute():
            hessian, damping, _ = self.hessian()
            solved = np.linalg.solve(hessian + damping * np.eye(len(hessian)), self.gradients("train").T)
            return self.gradients("test") @ solved, np.einsum("ip,pi->i", self.gradients("train"), solved)
        return self.cached("influence", compute)

    def features(self, inputs: Any) -> np.ndarray:
        """Input of the last (bias-free Dense) layer, float64: (N, D)."""
        return np.asarray(self.zoo.features(inputs), np.float64)

    def last_kernel(self) -> np.ndarray:
        """Kernel of the last Dense layer, float64: (D, C)."""
        return np.asarray(self.model.layers[-1].kernel.numpy(), np.float64)


class Checks:
    """Collects the comparisons of one method."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.items: List[Dict[str, Any]] = []

    def compare(self, name: str, actual: Any, expected: np.ndarray, tolerance: Optional[float] = None) -> None:
        """Record ``max |actual - expected|`` against ``tolerance · max |expected|``."""
        actual = np.asarray(actual, np.float64)
        expected = np.asarray(expected, np.float64)
        item = {"name": name, "tol": tolerance or self.tolerance, "scale": float(np.abs(expected).max()),
                "error": float("nan"), "problem": None}
        if actual.shape != expected.shape:
            item["problem"] = f"shape {actual.shape}, expected {expected.shape}"
        elif not np.isfinite(actual).all():
            item["problem"] = "non-finite values"
        else:
            item["error"] = float(np.abs(actual - expected).max())
        self.items.append(item)


def matrix_in_batches(calculator: Any, test: tf.data.Dataset, train: tf.data.Dataset) -> np.ndarray:
    """``estimate_influence_values_in_batches`` gathered into one (N_test, N_train) matrix."""
    rows = []
    for _, inner in calculator.estimate_influence_values_in_batches(test, train):
        rows.append(np.concatenate([values.numpy() for _, values in inner], axis=1))
    return np.concatenate(rows, axis=0)


def self_influence(calculator: Any, train: tf.data.Dataset) -> np.ndarray:
    """``compute_influence_values`` gathered into (N_train,)."""
    return np.concatenate([values.numpy()[:, 0] for _, values in calculator.compute_influence_values(train)])


def check_influence(case: Case, checks: Checks, calculator: Any, with_batches: bool = False) -> None:
    """Pairwise matrix and self-influence against the exact damped influence."""
    pairwise, self_values = case.influence()
    checks.compare("pairwise matrix", calculator.estimate_influence_values_matrix(case.test, case.train).numpy(),
                   pairwise)
    if with_batches:
        checks.compare("pairwise in batches", matrix_in_batches(calculator, case.test, case.train), pairwise)
    checks.compare("self-influence", self_influence(calculator, case.train), self_values)


# Methods ------------------------------------------------------------------------------------------
def run_gradients(case: Case, checks: Checks) -> None:
    """Per-sample gradients of the watched layers and of every trainable weight, batch by batch."""
    influence_model = case.influence_model()
    library = np.concatenate([influence_model.batch_jacobian_tensor(tuple(batch)).numpy() for batch in case.train])
    checks.compare("watched layers (train batches)", library, case.gradients("train"))
    checks.compare("watched layers (test batches)", influence_model.batch_jacobian(case.test).numpy(),
                   case.gradients("test"))
    variables = list(case.model.trainable_variables)
    if len(variables) == len(case.variables):
        return  # the watched layers hold every trainable weight: checked above
    every_weight = BaseInfluenceModel(case.model, loss_function=case.zoo.loss)
    checks.compare(f"every trainable weight (P = {every_weight.nb_params})",
                   every_weight.batch_jacobian(case.train).numpy(),
                   tape_gradients(case.zoo, case.model, variables, case.x_train, case.y_train))


def run_tracin(case: Case, checks: Checks) -> None:
    """TracIn with two checkpoints (the model and a copy with other weights)."""
    other = BUILDERS[case.name](1)
    other_variables = watched_variables(other, other.model)
    calculator = TracIn([case.influence_model(), case.influence_model(other.model)], list(LEARNING_RATES))
    other_train = tape_gradients(other, other.model, other_variables, case.x_train, case.y_train)
    other_test = tape_gradients(other, other.model, other_variables, case.x_test, case.y_test)
    pairwise = (LEARNING_RATES[0] * case.gradients("test") @ case.gradients("train").T
                + LEARNING_RATES[1] * other_test @ other_train.T)
    self_values = (LEARNING_RATES[0] * (case.gradients("train") ** 2).sum(axis=1)
                   + LEARNING_RATES[1] * (other_train ** 2).sum(axis=1))
    checks.compare("pairwise matrix", calculator.estimate_influence_values_matrix(case.test, case.train).numpy(),
                   pairwise)
    checks.compare("pairwise in batches", matrix_in_batches(calculator, case.test, case.train), pairwise)
    checks.compare("self-influence", self_influence(calculator, case.train), self_values)


def run_exact(case: Case, checks: Checks) -> None:
    """First-order influence with ExactIHVP (λ > 0)."""
    _, damping, _ = case.hessian()
    influence_model = case.influence_model()
    ihvp = ExactIHVP(influence_model, case.train, regularization=damping)
    checks.compare("mean Hessian", ihvp.hessian.numpy(), case.hessian()[0])
    check_influence(case, checks, FirstOrderInfluenceCalculator(influence_model, case.train, ihvp), True)


def run_cg(case: Case, checks: Checks) -> None:
    """First-order influence with ConjugateGradientDescentIHVP (block CG)."""
    _, damping, _ = case.hessian()
    influence_model = case.influence_model()
    ihvp = ConjugateGradientDescentIHVP(influence_model, train_dataset=case.train, n_opt_iters=200,
                                        regularization=damping, tol=CG_TOL[case.zoo.precision], atol=0.0)
    check_influence(case, checks, FirstOrderInfluenceCalculator(influence_model, case.train, ihvp))


def run_lissa(case: Case, checks: Checks) -> None:
    """First-order influence with LissaIHVP (no LiSSA damping, scale above the largest eigenvalue of H + λI)."""
    _, damping, eigenvalues = case.hessian()
    influence_model = case.influence_model()
    ihvp = LissaIHVP(influence_model, train_dataset=case.train, n_opt_iters=LISSA_ITERATIONS[case.zoo.precision],
                     damping=0.0, scale=1.2 * (eigenvalues.max() + damping), regularization=damping)
    check_influence(case, checks, FirstOrderInfluenceCalculator(influence_model, case.train, ihvp))


def run_arnoldi(case: Case, checks: Checks) -> None:
    """ArnoldiInfluenceCalculator with the full Krylov space (k = m = P): equal to the exact values."""
    _, damping, _ = case.hessian()
    influence_model = case.influence_model()
    size = influence_model.nb_params
    calculator = ArnoldiInfluenceCalculator(influence_model, case.train, subspace_dim=size, force_hermitian=True,
                                            k_largest_eig_vals=size, dtype=influence_model.dtype,
                                            regularization=damping, seed=0)
    check_influence(case, checks, calculator)


def _representer_values(alpha: np.ndarray, z_train: np.ndarray, z_test: np.ndarray,
                        kernel: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``alpha[i, pred(t)] <z_i, z_t>`` (N_test, N_train) and ``|alpha[i, pred(i)]|`` (N_train,)."""
    predicted_test = (z_test @ kernel).argmax(axis=1)
    predicted_train = (z_train @ kernel).argmax(axis=1)
    pairwise = (z_test @ z_train.T) * alpha[:, predicted_test].T
    return pairwise, np.abs(alpha[np.arange(len(alpha)), predicted_train])


# Relative gap between the two largest logits below which the predicted class is left to rounding: bfloat16
# activations round differently in the library's compiled graphs (one bfloat16 ulp of a feature can swap two
# nearly tied logits, and the representer values follow the predicted class).
AMBIGUOUS_GAP = {"float32": 0.0, "float64": 0.0, "bfloat16": 2e-2}


def _decided(case: Case, features: np.ndarray) -> np.ndarray:
    """Samples whose predicted class does not depend on rounding: (N,) bool."""
    logits = np.sort(features @ case.last_kernel(), axis=1)
    return logits[:, -1] - logits[:, -2] > AMBIGUOUS_GAP[case.zoo.precision] * np.abs(logits).max()


def compare_representer_values(case: Case, checks: Checks, calculator: Any, pairwise: np.ndarray,
                               self_values: np.ndarray) -> None:
    """Pairwise values and self-influence of an RPS calculator, on the samples whose predicted class is decided."""
    test_rows = _decided(case, case.features(case.x_test))
    train_rows = _decided(case, case.features(case.x_train))
    note = ""
    if not (test_rows.all() and train_rows.all()):
        note = f" ({(~test_rows).sum()} test, {(~train_rows).sum()} training samples with tied logits left out)"
    checks.compare("pairwise matrix" + note,
                   calculator.estimate_influence_values_matrix(case.test, case.train).numpy()[test_rows],
                   pairwise[test_rows])
    checks.compare("self-influence" + note, self_influence(calculator, case.train)[train_rows],
                   self_values[train_rows])


def run_rps_l2(case: Case, checks: Checks) -> None:
    """RPS-L2 on the logits: ridge regression of the original logits on the features (float64 NumPy)."""
    # A few gradient steps, then Newton-CG (exact on this quadratic objective).
    calculator = RepresenterPointL2(case.model, case.train, None, lambda_regularization=RPS_L2_LAMBDA, epochs=5,
                                    surrogate_target="logits")
    z_train, z_test, kernel = case.features(case.x_train), case.features(case.x_test), case.last_kernel()
    logits, n = z_train @ kernel, len(z_train)
    ridge = np.linalg.solve(z_train.T @ z_train / n + RPS_L2_LAMBDA * np.eye(len(kernel)), z_train.T @ logits / n)
    alpha = (logits - z_train @ ridge) / (RPS_L2_LAMBDA * n)  # -1/(2λn) ∂||Φ - T||²/∂Φ
    pairwise, self_values = _representer_values(alpha, z_train, z_test, kernel)
    checks.compare("surrogate kernel", calculator.surrogate.layers[-1].kernel.numpy(), ridge)
    compare_representer_values(case, checks, calculator, pairwise, self_values)
    # Representer theorem: summing over the training set rebuilds the surrogate's logit of the predicted class.
    predicted = (z_test @ kernel).argmax(axis=1)
    checks.compare("representer theorem", pairwise.sum(axis=1), (z_test @ ridge)[np.arange(len(z_test)), predicted])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def run_rps_lje(case: Case, checks: Checks) -> None:
    """RPS-LJE against its derivation in float64 NumPy (ascent step, Kronecker Hessian of the softmax
    cross-entropy, damped solve, least-squares projection)."""
    z, y, kernel = case.features(case.x_train), case.y_train.astype(np.float64), case.last_kernel()
    n, width = z.shape
    classes = kernel.shape[1]
    perturbed = kernel + LJE_ETA * z.T @ (_softmax(z @ kernel) - y)
    probabilities = _softmax(z @ perturbed)
    curvature = np.einsum("ic,ce->ice", probabilities, np.eye(classes)) - np.einsum("ic,ie->ice", probabilities,
                                                                                    probabilities)
    hessian = np.einsum("id,ie,icf->dcef", z, z, curvature).reshape(width * classes, width * classes) / n
    damping = 0.1 * np.linalg.eigvalsh(hessian).max()
    gradients = np.einsum("id,ic->idc", z, probabilities - y).reshape(n, width * classes)
    corrections = np.linalg.solve(hessian + damping * np.eye(len(hessian)), gradients.T).T.reshape(n, width, classes)
    alpha = np.einsum("idc,id->ic", (perturbed[None] - corrections) / n, z) / (z ** 2).sum(axis=1, keepdims=True)
    calculator = RepresenterPointLJE(case.influence_model(), case.train, ExactIHVPFactory(regularization=damping))
    pairwise, self_values = _representer_values(alpha, z, case.features(case.x_test), kernel)
    checks.compare("alpha", np.concatenate([calculator.compute_alpha(tuple(batch)).numpy() for batch in case.train]),
                   alpha)
    compare_representer_values(case, checks, calculator, pairwise, self_values)


RUNNERS: Dict[str, Callable[[Case, Checks], None]] = {
    "gradients": run_gradients, "tracin": run_tracin, "exact": run_exact, "cg": run_cg, "lissa": run_lissa,
    "arnoldi": run_arnoldi, "rps_l2": run_rps_l2, "rps_lje": run_rps_lje,
}
assert tuple(RUNNERS) == METHODS


def run_not_applicable(case: Case, method: str) -> str:
    """Build the method's calculator on a model it does not apply to; return the error it raised."""
    try:
        if method == "rps_l2":
            RepresenterPointL2(case.model, case.train, None, surrogate_target="logits")
        elif method == "rps_lje":
            RepresenterPointLJE(case.influence_model(), case.train)
        else:
            raise AssertionError(f"no refusal check written for {method}")
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error raised"


def run_method(case: Case, method: str) -> Dict[str, Any]:
    """Run one method and return its JSON-able result."""
    result: Dict[str, Any] = {"method": method, "error": None, "traceback": None, "checks": [], "warnings": [],
                              "not_applicable": (case.name, method) in NOT_APPLICABLE}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if result["not_applicable"]:
                result["raised"] = run_not_applicable(case, method)
            else:
                checks = Checks(case.tolerances[method])
                RUNNERS[method](case, checks)
                result["checks"] = checks.items
        except Exception as error:  # pylint: disable=broad-except
            result["error"] = f"{type(error).__name__}: {error}"[:3000]
            result["traceback"] = traceback.format_exc()[-4000:]
    result["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                                 if not issubclass(w.category, DeprecationWarning)})
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def main(argv: Sequence[str]) -> int:
    """Entry point: ``zoo_case.py MODEL [METHOD ...]``."""
    if not argv or argv[0] not in BUILDERS:
        print(f"usage: zoo_case.py MODEL [METHOD ...], MODEL in {list(BUILDERS)}", file=sys.stderr)
        return 2
    methods = list(argv[1:]) or list(METHODS)
    started = time.perf_counter()
    case = Case(argv[0])
    print(f"ZOO-SETUP {time.perf_counter() - started:.2f}", flush=True)
    for method in methods:
        print(f"ZOO-START {method}", flush=True)
        print("ZOO-RESULT " + json.dumps(run_method(case, method)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
