"""The shared API's contract, checked on every calculator and every registered solver with the same tests.

Every case of :func:`tests.contract.cases.build_cases` (influence functions with each registered solver, RelatIF,
Arnoldi, TracIn, RPS-L2, RPS-LJE with each registered solver, the two boundary methods) goes through:

1. the shapes and dtypes of the eager results (``self_influence``, ``self_influence_top_k``, ``influence_matrix``,
   ``influence_top_k``);
2. their consistency: self-influence is the diagonal of the matrix where the method defines it so; top-k are the
   stable NumPy top-k of the matrix / of the self-influence, in both orders; samples are the inputs at the indices;
3. the reference's dataset API agrees with the eager API (``compute_influence_values``,
   ``estimate_influence_values_in_batches`` computing the training vectors in memory or per test batch,
   ``top_k``); the caching machinery shared by all solvers (no cache, disk: saved, then loaded) and
   ``compute_top_k_from_training_dataset`` run on one representative case per family;
4. exact ties keep the earlier training sample first;
5. batch sizes (short last batches included) change nothing;
6. bad ``k`` and unbatched datasets raise ``ValueError`` naming the problem;
7. a solver registered at test time is found by name.
"""
import dataclasses
import os
import re
from typing import Any, Callable, Dict, Iterator

import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (CACHE, ExactConfig, ExactIHVP, TopK, register_solver, registered_solvers,
                                     solver_names, solver_registry)
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.utils import ORDER

from .cases import (LAMBDA, N_TEST, N_TRAIN, TEST_BATCH_ALT, TIE_OFFSET, TRAIN_BATCH, TRAIN_BATCH_ALT, X_TEST,
                    X_TIES, X_TRAIN, Y_TIES, Calculators, assert_close, assert_top_k, build_cases,
                    column_from_dataset, dataset, evaluation_set, last_layer_model, matrix_from_batches,
                    top_k_from_dataset, training_set, unbatched_set)

K = 5
# (order, k) of the top-k checks: both orders, and the whole ranking.
TOP_K_CALLS = [(ORDER.DESCENDING, K), (ORDER.ASCENDING, K), (ORDER.DESCENDING, N_TRAIN)]
CASES = build_cases()
PAIRWISE = [case for case in CASES if case.pairwise]
DIAGONAL = [case for case in CASES if case.self_is_diagonal]
REPRESENTATIVES = [case for case in CASES if case.representative]
PAIRWISE_REPRESENTATIVES = [case for case in PAIRWISE if case.representative]


def _cases(cases):
    return pytest.mark.parametrize("case", cases, ids=str)


class Results(Calculators):
    """The calculators, and their reference eager results computed once."""

    def __init__(self):
        super().__init__()
        self._memo: Dict[Any, np.ndarray] = {}

    def _remember(self, case: Any, key: str, compute: Callable[[Any], tf.Tensor]) -> np.ndarray:
        if (case.name, key) not in self._memo:
            self._memo[(case.name, key)] = compute(self(case)).numpy()
        return self._memo[(case.name, key)]

    def self_influence(self, case: Any) -> np.ndarray:
        """``self_influence(training_set())`` (N,)."""
        return self._remember(case, "self", lambda calc: calc.self_influence(training_set()))

    def matrix(self, case: Any) -> np.ndarray:
        """``influence_matrix(evaluation_set(), training_set())`` (T, N)."""
        return self._remember(case, "matrix", lambda calc: calc.influence_matrix(evaluation_set(), training_set()))


@pytest.fixture(name="results", scope="module")
def _results() -> Results:
    return Results()


def _assert_earlier_first(indices: Any, what: str) -> None:
    """In every ranking of the whole tie set, sample i (i < TIE_OFFSET) comes before its copy i + TIE_OFFSET."""
    positions = np.argsort(np.asarray(indices), axis=-1, kind="stable")
    earlier, later = positions[..., :TIE_OFFSET], positions[..., TIE_OFFSET:2 * TIE_OFFSET]
    assert np.all(earlier < later), f"{what}: a copy ranks before the earlier sample ({np.asarray(indices)})"


def _check_batches(result: tf.data.Dataset, reference: np.ndarray, case: Any, what: str) -> None:
    """``estimate_influence_values_in_batches``' nested structure, and its values against ``reference``."""
    offset = 0
    for (test_inputs, _), inner in result:
        test_size = int(test_inputs.shape[0])
        np.testing.assert_array_equal(test_inputs.numpy(), X_TEST[offset:offset + test_size])
        train_offset = 0
        for (train_inputs, _), values in inner:
            train_size = int(train_inputs.shape[0])
            np.testing.assert_array_equal(train_inputs.numpy(), X_TRAIN[train_offset:train_offset + train_size])
            assert values.shape == (test_size, train_size), f"{what}: block of shape {values.shape}"
            train_offset += train_size
        assert train_offset == N_TRAIN, what
        offset += test_size
    assert offset == N_TEST, what
    assert_close(matrix_from_batches(result), reference, case.atol_scale, what)


def _check_top_k_dataset(result: tf.data.Dataset, reference: np.ndarray, order: ORDER, case: Any,
                         what: str) -> None:
    """``top_k(..., return_indices=True)``'s elements against the top-k of ``reference``."""
    inputs, values, samples, indices = top_k_from_dataset(result)
    np.testing.assert_array_equal(inputs, X_TEST)
    assert_top_k(values, indices, reference, K, order, case.atol_scale, what)
    np.testing.assert_array_equal(samples, X_TRAIN[indices])


# 1. Shapes and dtypes ------------------------------------------------------------------------------------------------
@_cases(CASES)
def test_self_influence_shapes_and_dtypes(case, results):
    """self_influence is (N,) float32; self_influence_top_k a TopK of (k,) values, int64 indices in [0, N), samples."""
    calc = results(case)
    values = calc.self_influence(training_set())
    assert isinstance(values, tf.Tensor) and values.shape == (N_TRAIN,) and values.dtype == tf.float32
    assert np.all(np.isfinite(values.numpy()))
    for return_samples in (False, True):
        top = calc.self_influence_top_k(training_set(), K, return_samples=return_samples)
        assert isinstance(top, TopK)
        assert top.values.shape == (K,) and top.values.dtype == tf.float32
        assert top.indices.shape == (K,) and top.indices.dtype == tf.int64
        assert np.all((top.indices.numpy() >= 0) & (top.indices.numpy() < N_TRAIN))
        if return_samples:
            assert top.samples.shape == (K,) + X_TRAIN.shape[1:] and top.samples.dtype == tf.float32
        else:
            assert top.samples is None


@_cases(PAIRWISE)
def test_pairwise_shapes_and_dtypes(case, results):
    """influence_matrix is (T, N) float32; influence_top_k a TopK of (T, k) values, int64 indices, samples."""
    calc = results(case)
    matrix = calc.influence_matrix(evaluation_set(), training_set())
    assert isinstance(matrix, tf.Tensor) and matrix.shape == (N_TEST, N_TRAIN) and matrix.dtype == tf.float32
    assert np.all(np.isfinite(matrix.numpy()))
    for return_samples in (False, True):
        top = calc.influence_top_k(evaluation_set(), training_set(), K, return_samples=return_samples)
        assert isinstance(top, TopK)
        assert top.values.shape == (N_TEST, K) and top.values.dtype == tf.float32
        assert top.indices.shape == (N_TEST, K) and top.indices.dtype == tf.int64
        assert np.all((top.indices.numpy() >= 0) & (top.indices.numpy() < N_TRAIN))
        if return_samples:
            assert top.samples.shape == (N_TEST, K) + X_TRAIN.shape[1:] and top.samples.dtype == tf.float32
        else:
            assert top.samples is None


# 2. Consistency of the eager results ---------------------------------------------------------------------------------
@_cases(DIAGONAL)
def test_self_influence_is_the_diagonal_of_the_matrix(case, results):
    """Where the method defines self-influence as I(z, z), it is the diagonal of influence_matrix(train, train)."""
    diagonal = np.diag(results(case).influence_matrix(training_set(), training_set()).numpy())
    assert_close(results.self_influence(case), diagonal, case.atol_scale, "self_influence vs diag(influence_matrix)")


@_cases(CASES)
def test_self_influence_top_k_is_the_numpy_top_k(case, results):
    """self_influence_top_k is the stable top-k of self_influence, with the inputs at its indices."""
    reference = results.self_influence(case)
    for order, k in TOP_K_CALLS:
        top = results(case).self_influence_top_k(training_set(), k, order=order, return_samples=True)
        assert_top_k(top.values, top.indices, reference, k, order, case.atol_scale,
                     f"self_influence_top_k(k={k}, {order})")
        np.testing.assert_array_equal(top.samples.numpy(), X_TRAIN[top.indices.numpy()])


@_cases(PAIRWISE)
def test_influence_top_k_is_the_numpy_top_k_of_the_matrix(case, results):
    """influence_top_k is the stable top-k of each row of influence_matrix, with the inputs at its indices."""
    reference = results.matrix(case)
    for order, k in TOP_K_CALLS:
        top = results(case).influence_top_k(evaluation_set(), training_set(), k, order=order, return_samples=True)
        assert_top_k(top.values, top.indices, reference, k, order, case.atol_scale, f"influence_top_k(k={k}, {order})")
        np.testing.assert_array_equal(top.samples.numpy(), X_TRAIN[top.indices.numpy()])


# 3. The dataset API agrees with the eager API -------------------------------------------------------------------------
@_cases(CASES)
def test_compute_influence_values_agrees(case, results):
    """compute_influence_values yields ((x, y), (B, 1) values) equal to self_influence, in order."""
    result = results(case).compute_influence_values(training_set())
    inputs = np.concatenate([batch[0].numpy() for batch, _ in result])
    np.testing.assert_array_equal(inputs, X_TRAIN)
    assert_close(column_from_dataset(result), results.self_influence(case), case.atol_scale,
                 "compute_influence_values")


@_cases(REPRESENTATIVES)
def test_compute_top_k_from_training_dataset_agrees(case, results):
    """compute_top_k_from_training_dataset is self_influence_top_k in the reference's form."""
    calc = results(case)
    for order in ORDER:
        samples, values, indices = calc.compute_top_k_from_training_dataset(training_set(), K, order,
                                                                            return_indices=True)
        assert samples.shape == (K,) + X_TRAIN.shape[1:] and values.shape == (K,) and indices.dtype == tf.int64
        assert_top_k(values, indices, results.self_influence(case), K, order, case.atol_scale,
                     f"compute_top_k_from_training_dataset({order})")
        np.testing.assert_array_equal(samples.numpy(), X_TRAIN[indices.numpy()])
    assert len(calc.compute_top_k_from_training_dataset(training_set(), K)) == 2


@_cases(PAIRWISE)
def test_estimate_influence_values_matrix_agrees(case, results):
    """estimate_influence_values_matrix is influence_matrix."""
    matrix = results(case).estimate_influence_values_matrix(evaluation_set(), training_set())
    assert_close(matrix.numpy(), results.matrix(case), case.atol_scale, "estimate_influence_values_matrix")


@pytest.mark.parametrize("cache", [CACHE.MEMORY, CACHE.NO_CACHE], ids=lambda cache: cache.name.lower())
@_cases(PAIRWISE)
def test_estimate_influence_values_in_batches_agrees(case, cache, results):
    """estimate_influence_values_in_batches' nested blocks put together are influence_matrix."""
    # NO_CACHE computes the training vectors inside the dataset's map functions (graph mode): every solver's solve
    # must work there.
    result = results(case).estimate_influence_values_in_batches(evaluation_set(), training_set(),
                                                                influence_vector_in_cache=cache)
    _check_batches(result, results.matrix(case), case, f"estimate_influence_values_in_batches({cache})")


@_cases(PAIRWISE)
def test_top_k_dataset_agrees(case, results):
    """top_k(..., return_indices=True) yields per test batch the values, inputs and indices of influence_top_k."""
    calc, reference = results(case), results.matrix(case)
    result = calc.top_k(evaluation_set(), training_set(), K, influence_vector_in_cache=CACHE.MEMORY,
                        return_indices=True)
    _check_top_k_dataset(result, reference, ORDER.DESCENDING, case, "top_k(MEMORY)")
    without_indices = next(iter(calc.top_k(evaluation_set(), training_set(), K, order=ORDER.ASCENDING)))
    assert len(without_indices) == 3
    if case.representative:
        result = calc.top_k(evaluation_set(), training_set(), K, order=ORDER.ASCENDING,
                            influence_vector_in_cache=CACHE.NO_CACHE, return_indices=True)
        _check_top_k_dataset(result, reference, ORDER.ASCENDING, case, "top_k(NO_CACHE)")


@_cases(PAIRWISE_REPRESENTATIVES)
def test_disk_cache_saves_then_loads(case, results, tmp_path):
    """CACHE.DISK: vectors saved by one call and loaded by the next give the same values and top-k."""
    calc, reference = results(case), results.matrix(case)
    path = os.path.join(str(tmp_path), "influence_vectors")
    saved = calc.estimate_influence_values_in_batches(evaluation_set(), training_set(), CACHE.DISK,
                                                      save_influence_vector_path=path)
    assert os.path.exists(path), "CACHE.DISK with a save path wrote nothing"
    _check_batches(saved, reference, case, "estimate_influence_values_in_batches(DISK, save)")
    loaded = calc.estimate_influence_values_in_batches(evaluation_set(), training_set(), CACHE.DISK,
                                                       load_influence_vector_path=path)
    _check_batches(loaded, reference, case, "estimate_influence_values_in_batches(DISK, load)")
    # top_k reads the vectors saved by estimate_influence_values_in_batches: one format for both.
    result = calc.top_k(evaluation_set(), training_set(), K, order=ORDER.ASCENDING,
                        influence_vector_in_cache=CACHE.DISK, load_influence_vector_ds_path=path, return_indices=True)
    _check_top_k_dataset(result, reference, ORDER.ASCENDING, case, "top_k(DISK, load)")


# 4. Ties ----------------------------------------------------------------------------------------------------------
@_cases(CASES)
def test_ties_keep_the_earlier_sample_first(case, results):
    """Identical training samples get identical values, and every top-k ranks the earlier one first."""
    calc = results(case)
    ties = dataset(X_TIES, Y_TIES, TRAIN_BATCH)
    size = len(X_TIES)
    values = calc.self_influence(ties).numpy()
    # Training batches 0 and 1 hold the same samples: the values must be the same numbers.
    np.testing.assert_array_equal(values[:TIE_OFFSET], values[TIE_OFFSET:2 * TIE_OFFSET])
    for order in ORDER:
        top = calc.self_influence_top_k(ties, size, order=order)
        assert_top_k(top.values, top.indices, values, size, order, case.atol_scale,
                     f"self_influence_top_k on ties ({order})")
        _assert_earlier_first(top.indices, f"self_influence_top_k ({order})")
    if case.representative:
        _, _, indices = calc.compute_top_k_from_training_dataset(ties, size, ORDER.ASCENDING, return_indices=True)
        _assert_earlier_first(indices, "compute_top_k_from_training_dataset")
    if not case.pairwise:
        return
    matrix = calc.influence_matrix(evaluation_set(), ties).numpy()
    np.testing.assert_array_equal(matrix[:, :TIE_OFFSET], matrix[:, TIE_OFFSET:2 * TIE_OFFSET])
    for order in ORDER:
        top = calc.influence_top_k(evaluation_set(), ties, size, order=order)
        assert_top_k(top.values, top.indices, matrix, size, order, case.atol_scale,
                     f"influence_top_k on ties ({order})")
        _assert_earlier_first(top.indices, f"influence_top_k ({order})")
    if case.representative:
        result = calc.top_k(evaluation_set(), ties, size, order=ORDER.DESCENDING,
                            influence_vector_in_cache=CACHE.NO_CACHE, return_indices=True)
        _assert_earlier_first(top_k_from_dataset(result)[3], "top_k(NO_CACHE)")


# 5. Batch sizes --------------------------------------------------------------------------------------------------
@_cases(CASES)
def test_batch_sizes_change_nothing(case, results):
    """Other batch sizes (other short last batches) give the same values and top-k."""
    calc = results(case)
    train = training_set(TRAIN_BATCH_ALT)
    assert_close(calc.self_influence(train).numpy(), results.self_influence(case), case.atol_scale,
                 "self_influence with other batch sizes")
    top = calc.self_influence_top_k(train, K)
    assert_top_k(top.values, top.indices, results.self_influence(case), K, ORDER.DESCENDING, case.atol_scale,
                 "self_influence_top_k with other batch sizes")
    if not case.pairwise:
        return
    evaluation, reference = evaluation_set(TEST_BATCH_ALT), results.matrix(case)
    assert_close(calc.influence_matrix(evaluation, train).numpy(), reference, case.atol_scale,
                 "influence_matrix with other batch sizes")
    for order in ORDER:
        top = calc.influence_top_k(evaluation, train, K, order=order)
        assert_top_k(top.values, top.indices, reference, K, order, case.atol_scale,
                     f"influence_top_k with other batch sizes ({order})")
    result = calc.top_k(evaluation, train, K, return_indices=True)
    _check_top_k_dataset(result, reference, ORDER.DESCENDING, case, "top_k with other batch sizes")


# 6. Errors --------------------------------------------------------------------------------------------------------
def _assert_value_error(name: str, call: Callable[[], Any], pattern: str) -> None:
    """``call()`` raises ``ValueError`` with a message matching ``pattern``."""
    try:
        call()
    except ValueError as error:
        assert re.search(pattern, str(error)), f"{name}: the message does not match {pattern!r}: {error}"
        return
    pytest.fail(f"{name} did not raise ValueError")


def _top_k_calls(calc: Any, case: Any, k: Any) -> Dict[str, Callable[[], Any]]:
    """The top-k entry points of ``calc`` called with ``k`` (those of the dataset API's shared machinery on
    representatives only)."""
    calls = {"self_influence_top_k": lambda: calc.self_influence_top_k(training_set(), k)}
    if case.representative:
        calls["compute_top_k_from_training_dataset"] = \
            lambda: calc.compute_top_k_from_training_dataset(training_set(), k)
    if case.pairwise:
        calls["influence_top_k"] = lambda: calc.influence_top_k(evaluation_set(), training_set(), k)
        for cache in (CACHE.MEMORY, CACHE.NO_CACHE) if case.representative else (CACHE.MEMORY,):
            calls[f"top_k({cache})"] = lambda cache=cache: list(
                calc.top_k(evaluation_set(), training_set(), k, influence_vector_in_cache=cache))
    return calls


@pytest.mark.parametrize("k", [0, -1, N_TRAIN + 1], ids=["zero", "negative", "more_than_n"])
@_cases(CASES)
def test_bad_k_raises_value_error_naming_k(case, k, results):
    """k < 1 and k > N raise ValueError naming k and its value, in every top-k entry point."""
    for name, call in _top_k_calls(results(case), case, k).items():
        _assert_value_error(name, call, rf"\bk\b.*{k}")


@_cases(CASES)
def test_unbatched_dataset_raises_value_error(case, results):
    """An unbatched dataset raises ValueError naming the dataset, in every entry point."""
    calc = results(case)
    unbatched = unbatched_set()
    calls = {
        "self_influence": lambda: calc.self_influence(unbatched),
        "self_influence_top_k": lambda: calc.self_influence_top_k(unbatched, K),
        "compute_influence_values": lambda: calc.compute_influence_values(unbatched),
        "compute_top_k_from_training_dataset": lambda: calc.compute_top_k_from_training_dataset(unbatched, K),
    }
    if case.pairwise:
        calls.update({
            "influence_matrix(test)": lambda: calc.influence_matrix(unbatched, training_set()),
            "influence_matrix(train)": lambda: calc.influence_matrix(evaluation_set(), unbatched),
            "influence_top_k(test)": lambda: calc.influence_top_k(unbatched, training_set(), K),
            "influence_top_k(train)": lambda: calc.influence_top_k(evaluation_set(), unbatched, K),
            "estimate_influence_values_in_batches(test)":
                lambda: calc.estimate_influence_values_in_batches(unbatched, training_set()),
            "estimate_influence_values_in_batches(train)":
                lambda: calc.estimate_influence_values_in_batches(evaluation_set(), unbatched),
            "top_k(test)": lambda: calc.top_k(unbatched, training_set(), K),
            "top_k(train)": lambda: calc.top_k(evaluation_set(), unbatched, K),
        })
    for name, call in calls.items():
        # The message names the dataset and says what is wrong with its batches.
        _assert_value_error(name, call, r"(train_set|test_set|dataset_to_evaluate).*batch")


# 7. A solver registered at test time --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ContractSolverConfig(ExactConfig):
    """Settings of :class:`ContractSolver`: those of the exact solver and a label."""

    label: str = "contract"


class ContractSolver(ExactIHVP):
    """The exact solver under another name, counting its solves."""

    solves = 0

    def __init__(self, model, train_dataset=None, fit_now=True, label="contract", **fields):
        super().__init__(model, train_dataset=train_dataset, fit_now=fit_now, **fields)
        self.label = label

    def solve(self, vectors: tf.Tensor) -> tf.Tensor:
        ContractSolver.solves += 1
        return super().solve(vectors)


CONTRACT_SOLVER = "contract_exact"


@pytest.fixture(name="contract_solver")
def _contract_solver() -> Iterator[str]:
    register_solver(CONTRACT_SOLVER, ContractSolver, ContractSolverConfig, aliases=("contract_alias",),
                    description="the exact solver, registered by the contract test")
    try:
        yield CONTRACT_SOLVER
    finally:
        registry = solver_registry._REGISTRY  # pylint: disable=protected-access
        for key in [key for key, entry in registry.items() if entry.solver_class is ContractSolver]:
            del registry[key]


def test_every_registered_solver_has_its_cases():
    """The cases are enumerated over the registry: each registered solver has its own."""
    names = set(solver_names())
    for family in ("first_order-", "rps_lje-"):
        assert {case.name[len(family):] for case in CASES if case.name.startswith(family)} == names


def test_a_solver_registered_at_test_time_is_found_by_name(contract_solver, results):
    """A solver registered now is built by name, alias and configuration, and passes the contract."""
    assert contract_solver in solver_names()
    assert any(entry.solver_class is ContractSolver for entry in registered_solvers())
    ContractSolver.solves = 0
    calc = FirstOrderInfluenceCalculator(last_layer_model(), training_set(), ihvp_calculator=contract_solver,
                                         regularization=LAMBDA)
    assert isinstance(calc.ihvp_calculator, ContractSolver) and calc.ihvp_calculator.label == "contract"
    by_alias = FirstOrderInfluenceCalculator(last_layer_model(), training_set(), ihvp_calculator="CONTRACT_ALIAS",
                                             regularization=LAMBDA)
    assert isinstance(by_alias.ihvp_calculator, ContractSolver)
    by_config = FirstOrderInfluenceCalculator(last_layer_model(), training_set(),
                                              ihvp_calculator=ContractSolverConfig(regularization=LAMBDA,
                                                                                   label="mine"))
    assert isinstance(by_config.ihvp_calculator, ContractSolver) and by_config.ihvp_calculator.label == "mine"
    # The new solver goes through the contract like the built-in ones, and agrees with the exact solver.
    matrix = calc.influence_matrix(evaluation_set(), training_set()).numpy()
    assert ContractSolver.solves > 0, "the registered solver was built but never used"
    exact = [case for case in CASES if case.name == "first_order-exact"][0]
    assert_close(matrix, results.matrix(exact), what="registered solver vs exact")
    assert_close(calc.self_influence(training_set()).numpy(),
                 np.diag(calc.influence_matrix(training_set(), training_set()).numpy()), what="diagonal")
    for order, k in TOP_K_CALLS:
        top = calc.influence_top_k(evaluation_set(), training_set(), k, order=order)
        assert_top_k(top.values, top.indices, matrix, k, order, what="registered solver top-k")
    with pytest.raises(ValueError, match="already registered"):
        register_solver(CONTRACT_SOLVER, ExactIHVP, ExactConfig)


def test_the_registered_solver_is_removed_afterwards():
    """The fixture leaves the registry as it found it."""
    assert CONTRACT_SOLVER not in solver_names()
    with pytest.raises(ValueError, match="ihvp_calculator"):
        FirstOrderInfluenceCalculator(last_layer_model(), training_set(), ihvp_calculator=CONTRACT_SOLVER)
