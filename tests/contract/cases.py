"""Every calculator of the library, built on one tiny seeded classifier, and NumPy references for the contract test.

The cases are enumerated, not hard-coded, over the solver registry: a solver registered before this module is
imported gets a first-order, a RelatIF and an RPS-LJE case of its own. Every solver is configured with its
defaults and ``regularization = LAMBDA`` (conjugate gradients need ``H + λI > 0``; Arnoldi's default subspace is
``min(P, 200) = P`` on these models, so it is exact).

The model is ``Input(4) -> Dense(5, relu) -> Dense(3, no bias, softmax)`` (the bias-free last layer is what the
representer points need). Influence functions watch the last layer only (P = 15): the cross-entropy is convex
there, so every solver sees a positive semi-definite Hessian; TracIn watches the whole model (two checkpoints).
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Tuple

import keras
import numpy as np
import tensorflow as tf

from deel.influenciae.boundary_based import SampleBoundaryCalculator, WeightsBoundaryCalculator
from deel.influenciae.common import InfluenceModel, registered_solvers
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE
from deel.influenciae.trac_in import TracIn
from deel.influenciae.utils import ORDER

LAMBDA = 0.1
N_TRAIN, N_TEST, N_FEATURES, N_CLASSES = 23, 7, 4, 3
TRAIN_BATCH, TRAIN_BATCH_ALT = 4, 10  # 23 = 5 * 4 + 3 and 2 * 10 + 3: short last batches
TEST_BATCH, TEST_BATCH_ALT = 5, 7  # 7 = 5 + 2 and one full batch

# Relative tolerance of comparisons between two computing paths of one calculator (float32), and the absolute one
# as a fraction of the largest magnitude compared.
RTOL = 1e-5
ATOL_SCALE = 1e-5


def _data(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    labels = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, n)]
    return inputs, labels


X_TRAIN, Y_TRAIN = _data(N_TRAIN, seed=0)
X_TEST, Y_TEST = _data(N_TEST, seed=1)

# The first training batch of 4 samples repeated in front: training batches 0 and 1 are identical, so columns i
# and i + 4 (i < 4) are exact ties, and the last batch is still short (27 = 6 * 4 + 3).
TIE_OFFSET = TRAIN_BATCH
X_TIES = np.concatenate([X_TRAIN[:TIE_OFFSET], X_TRAIN])
Y_TIES = np.concatenate([Y_TRAIN[:TIE_OFFSET], Y_TRAIN])


def dataset(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batched ``(x, y)`` dataset, in order."""
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)


def training_set(batch_size: int = TRAIN_BATCH) -> tf.data.Dataset:
    """The N_TRAIN training samples."""
    return dataset(X_TRAIN, Y_TRAIN, batch_size)


def evaluation_set(batch_size: int = TEST_BATCH) -> tf.data.Dataset:
    """The N_TEST samples to explain."""
    return dataset(X_TEST, Y_TEST, batch_size)


def unbatched_set() -> tf.data.Dataset:
    """The training samples, not batched."""
    return tf.data.Dataset.from_tensor_slices((X_TRAIN, Y_TRAIN))


def loss() -> keras.losses.Loss:
    """Per-sample (un-reduced) cross-entropy."""
    return keras.losses.CategoricalCrossentropy(reduction="none")


def classifier(seed: int = 0) -> keras.Model:
    """``Input(4) -> Dense(5, relu) -> Dense(3, no bias, softmax)`` with seeded weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(5, activation="relu"),
                             keras.layers.Dense(N_CLASSES, use_bias=False, activation="softmax")])


@functools.lru_cache(maxsize=None)
def shared_model() -> keras.Model:
    """The classifier most calculators explain (built once)."""
    return classifier(seed=0)


@functools.lru_cache(maxsize=None)
def last_layer_model() -> InfluenceModel:
    """The shared classifier watched on its last layer (P = 15)."""
    return InfluenceModel(shared_model(), start_layer=-1, loss_function=loss())


def solver_config(entry: Any) -> Any:
    """The default configuration of a registered solver with ``regularization = LAMBDA``."""
    return entry.config_class(regularization=LAMBDA)


@dataclasses.dataclass(frozen=True)
class Case:
    """One calculator under test.

    Attributes
    ----------
    name
        The test id.
    build
        Builds the calculator (called once per module).
    pairwise
        Whether it has the pairwise API (``influence_matrix``, ``influence_top_k``, the dataset API of
        ``BaseInfluenceCalculator``); boundary methods only score training samples on their own.
    self_is_diagonal
        Whether its documented self-influence is ``I(z, z)``, the diagonal of ``influence_matrix(train, train)``
        (influence functions, RelatIF, TracIn); representer points define it as ``|alpha[i, pred(i)]|``.
    representative
        Whether it is its family's representative (the first registered solver's case for the calculators that take
        a solver): the checks of the dataset API's caching machinery (no cache, disk), shared by every solver,
        run on representatives only.
    atol_scale
        Absolute tolerance between two computing paths of the calculator, as a fraction of the largest magnitude
        compared: float32 rounding, or the stopping tolerance of an iterative solver (two paths solve different
        blocks of right-hand sides, e.g. the test side or the training side).
    """

    name: str
    build: Callable[[], Any]
    pairwise: bool = True
    self_is_diagonal: bool = False
    representative: bool = True
    atol_scale: float = ATOL_SCALE

    def __str__(self) -> str:
        return self.name


def _first_order(entry: Any, normalize: bool) -> Callable[[], Any]:
    return lambda: FirstOrderInfluenceCalculator(last_layer_model(), training_set(),
                                                 ihvp_calculator=solver_config(entry), normalize=normalize)


def _rps_lje(entry: Any) -> Callable[[], Any]:
    return lambda: RepresenterPointLJE(last_layer_model(), training_set(), ihvp_calculator=solver_config(entry))


def _arnoldi() -> ArnoldiInfluenceCalculator:
    nb_params = last_layer_model().nb_params
    return ArnoldiInfluenceCalculator(last_layer_model(), training_set(), subspace_dim=nb_params,
                                      force_hermitian=True, k_largest_eig_vals=nb_params, regularization=LAMBDA)


def _tracin() -> TracIn:
    checkpoints = [InfluenceModel(classifier(seed), loss_function=loss()) for seed in (0, 1)]
    return TracIn(checkpoints, [0.1, 0.05])


def _rps_l2() -> RepresenterPointL2:
    return RepresenterPointL2(shared_model(), training_set(), loss(), lambda_regularization=LAMBDA)


def solver_atol_scale(entry: Any) -> float:
    """The tolerance of comparisons for a solver: float32 rounding, or its relative stopping tolerance (``tol``)
    when it has one."""
    return max(ATOL_SCALE, float(getattr(solver_config(entry), "tol", 0.0) or 0.0))


def build_cases() -> List[Case]:
    """Every calculator, and the solver-taking ones once per registered solver (RelatIF with the first one, the
    exact solver: it only normalises the vectors of the first-order calculator)."""
    solvers = registered_solvers()
    cases = [Case(f"first_order-{entry.name}", _first_order(entry, False), self_is_diagonal=True,
                  representative=position == 0, atol_scale=solver_atol_scale(entry))
             for position, entry in enumerate(solvers)]
    cases.append(Case(f"relatif-{solvers[0].name}", _first_order(solvers[0], True), self_is_diagonal=True,
                      atol_scale=solver_atol_scale(solvers[0])))
    cases.append(Case("arnoldi_calculator", _arnoldi, self_is_diagonal=True))
    cases.append(Case("tracin", _tracin, self_is_diagonal=True))
    cases.append(Case("rps_l2", _rps_l2))
    cases.extend(Case(f"rps_lje-{entry.name}", _rps_lje(entry), representative=position == 0,
                      atol_scale=solver_atol_scale(entry)) for position, entry in enumerate(solvers))
    # Weight-space DeepFool moves (and restores) the weights of its model: give it its own copy.
    cases.append(Case("weights_boundary", lambda: WeightsBoundaryCalculator(classifier(seed=0)), pairwise=False))
    cases.append(Case("sample_boundary", lambda: SampleBoundaryCalculator(shared_model()), pairwise=False))
    return cases


class Calculators:
    """Builds each case's calculator once and keeps it."""

    def __init__(self):
        self._built: Dict[str, Any] = {}

    def __call__(self, case: Case) -> Any:
        if case.name not in self._built:
            self._built[case.name] = case.build()
        return self._built[case.name]


# NumPy references -------------------------------------------------------------------------------------------------
def numpy_top_k(values: np.ndarray, k: int, order: ORDER) -> np.ndarray:
    """Positions of the k largest (DESCENDING) or smallest (ASCENDING) values along the last axis, best first;
    ties keep the earlier position (a stable sort)."""
    keys = -values if order == ORDER.DESCENDING else values
    return np.argsort(keys, axis=-1, kind="stable")[..., :k]


def tolerance(reference: np.ndarray, atol_scale: float = ATOL_SCALE) -> float:
    """Absolute tolerance for values of the magnitude of ``reference``."""
    return atol_scale * max(1.0, float(np.max(np.abs(reference))))


def assert_close(actual: Any, expected: Any, atol_scale: float = ATOL_SCALE, what: str = "") -> None:
    """``actual`` equals ``expected`` up to the tolerance between two computing paths."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=tolerance(expected, atol_scale),
                               err_msg=what)


def assert_top_k(values: Any, indices: Any, reference: np.ndarray, k: int, order: ORDER,
                 atol_scale: float = ATOL_SCALE, what: str = "") -> None:
    """``(values, indices)`` ((k,) or (T, k)) is the top-k of ``reference`` ((N,) or (T, N)) in ``order``.

    The indices must be those of a stable NumPy top-k; a different index is only accepted where its reference
    value is within the float32 tolerance of the expected one (two computing paths may break a near-tie either
    way; exact ties are checked separately).
    """
    values, indices, reference = np.asarray(values), np.asarray(indices), np.asarray(reference)
    assert indices.dtype == np.int64, f"{what}: indices dtype {indices.dtype}"
    assert values.shape == indices.shape == reference.shape[:-1] + (k,), \
        f"{what}: shapes {values.shape}, {indices.shape} for reference {reference.shape} and k={k}"
    assert np.all((indices >= 0) & (indices < reference.shape[-1])), f"{what}: indices out of range {indices}"
    rows = indices.reshape(-1, k)
    assert all(len(set(row)) == k for row in rows), f"{what}: repeated indices {indices}"
    expected_indices = numpy_top_k(reference, k, order)
    expected_values = np.take_along_axis(reference, expected_indices, -1)
    atol = tolerance(reference, atol_scale)
    np.testing.assert_allclose(values, expected_values, rtol=RTOL, atol=atol, err_msg=f"{what}: top-k values")
    found = np.take_along_axis(reference, indices, -1)
    np.testing.assert_allclose(found, values, rtol=RTOL, atol=atol, err_msg=f"{what}: values at the indices")
    differ = indices != expected_indices
    gaps = np.abs(found - expected_values)[differ]
    assert np.all(gaps <= atol + RTOL * np.abs(expected_values[differ])), \
        f"{what}: indices {indices} differ from the stable top-k {expected_indices} beyond near-ties"


# Readers of the dataset API -----------------------------------------------------------------------------------------
def dense(tensor: Any) -> np.ndarray:
    """A (possibly ragged) tensor as a NumPy array."""
    if isinstance(tensor, tf.RaggedTensor):
        tensor = tensor.to_tensor()
    return np.asarray(tensor)


def matrix_from_batches(result: tf.data.Dataset) -> np.ndarray:
    """The (T, N) matrix of ``estimate_influence_values_in_batches``'s nested datasets."""
    rows = []
    for _, inner in result:
        rows.append(np.concatenate([dense(values) for _, values in inner], axis=1))
    return np.concatenate(rows, axis=0)


def column_from_dataset(result: tf.data.Dataset) -> np.ndarray:
    """The (N,) values of ``compute_influence_values``' ``((x, y), values (B, 1))`` elements."""
    parts = []
    for _, values in result:
        values = dense(values)
        assert values.ndim == 2 and values.shape[1] == 1, f"values of shape {values.shape}, expected (B, 1)"
        parts.append(values[:, 0])
    return np.concatenate(parts)


def top_k_from_dataset(result: tf.data.Dataset) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(test inputs (T, d), values (T, k), train inputs (T, k, d), indices (T, k))`` of ``top_k(...,
    return_indices=True)``."""
    inputs, values, samples, indices = [], [], [], []
    for batch, batch_values, batch_samples, batch_indices in result:
        inputs.append(dense(batch[0]))
        values.append(dense(batch_values))
        samples.append(dense(batch_samples))
        indices.append(dense(batch_indices))
    return tuple(np.concatenate(part) for part in (inputs, values, samples, indices))
