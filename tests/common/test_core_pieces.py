"""The core pieces of the redesign: executor, vector store, curvature operators, the solver registry, the explicit
fit stage, compatibility shims and the public eager API, against closed forms on the toy model (SPEC §5)."""
import dataclasses
import warnings

import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (CACHE, ArnoldiConfig, ConjugateGradientConfig, CurvatureOperator, ExactConfig,
                                     ExactIHVP, Executor, HessianOperator, InfluenceModel, LissaConfig, TopK,
                                     build_solver, register_solver, registered_solvers, solver_names)
from deel.influenciae.common import solver_registry
from deel.influenciae.common.executor import EmptyDatasetError
from deel.influenciae.common.iterative_ihvp import ConjugateGradientDescentIHVP
from deel.influenciae.common.vector_store import DiskVectorStore, MemoryVectorStore, build_vector_store
from deel.influenciae.common.ihvp_factory import CGDIHVPFactory, LissaIHVPFactory
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.utils import ORDER

from ..toy_models import (toy_data, toy_dataset, toy_gradients_last_layer, toy_mean_hessian_all_layers,
                          toy_mean_hessian_last_layer, toy_model, toy_mse)

LAMBDA = 0.05


@pytest.fixture(name="toy", scope="module")
def _toy():
    model = toy_model("float64")
    x, y = toy_data(dtype=np.float64)
    x_test, y_test = toy_data(n=7, seed=5, dtype=np.float64)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=toy_mse("float64"))
    hessian = toy_mean_hessian_last_layer(model, x)
    gradients = toy_gradients_last_layer(model, x, y)
    test_gradients = toy_gradients_last_layer(model, x_test, y_test)
    inverse = np.linalg.inv(hessian + LAMBDA * np.eye(2))
    return {"model": influence_model, "x": x, "y": y, "train": toy_dataset(x, y, 4),
            "test": toy_dataset(x_test, y_test, 3), "hessian": hessian, "gradients": gradients,
            "test_gradients": test_gradients, "inverse": inverse,
            "pairwise": test_gradients @ inverse @ gradients.T,
            "self": np.einsum("np,pq,nq->n", gradients, inverse, gradients)}


# Executor -------------------------------------------------------------------------------------------------------
def test_executor_map_concat_sum_over_uneven_batches():
    data = np.arange(23, dtype=np.float64).reshape(23, 1)
    dataset = tf.data.Dataset.from_tensor_slices((data, data)).batch(5)
    executor = Executor()
    np.testing.assert_array_equal(executor.concat(lambda batch: 2 * batch[0], dataset).numpy(), 2 * data)
    assert [int(part.shape[0]) for part in executor.map(lambda batch: batch[0], dataset)] == [5, 5, 5, 5, 3]
    total, count = executor.sum(lambda batch: tf.reduce_sum(batch[0], axis=0), dataset, accumulate=tf.float64)
    assert count == 23 and float(total[0]) == data.sum()
    gathered = executor.gather(dataset)
    np.testing.assert_array_equal(gathered[1].numpy(), data)


def test_executor_empty_dataset_error_names_the_dataset():
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 2)), np.zeros((0, 1)))).batch(4)
    with pytest.raises(EmptyDatasetError, match="my_set is empty"):
        Executor().sum(lambda batch: batch[0], empty, name="my_set")
    with pytest.raises(ValueError, match="is empty"):
        Executor().concat(lambda batch: batch[0], empty)


def test_executor_reports_non_finite_batches():
    data = np.ones((6, 2))
    data[4, 1] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices((data, data)).batch(3)
    with pytest.raises(ValueError, match="batch 1 of checked_set, sample 4"):
        list(Executor().map(lambda batch: batch, dataset, name="checked_set"))


def test_executor_merges_consecutive_small_batches_in_order():
    """``merge_rows`` concatenates consecutive batches while they hold at most that many samples, keeps the order
    and the samples, yields a batch larger than ``merge_rows`` as it is, and still checks every batch read."""
    data = np.arange(23, dtype=np.float32).reshape(23, 1)
    dataset = tf.data.Dataset.from_tensor_slices((data, data[:, 0].astype(np.int64))).batch(5)
    executor = Executor()
    sizes = lambda rows: [int(batch[0].shape[0]) for batch in executor.batches(dataset, merge_rows=rows)]
    assert sizes(0) == [5, 5, 5, 5, 3] and sizes(4) == [5, 5, 5, 5, 3]
    assert sizes(10) == [10, 10, 3] and sizes(12) == [10, 10, 3] and sizes(13) == [10, 13]
    assert sizes(15) == [15, 8] and sizes(100) == [23]
    merged = list(executor.batches(dataset, merge_rows=12))
    np.testing.assert_array_equal(np.concatenate([batch[0].numpy() for batch in merged]), data)
    np.testing.assert_array_equal(np.concatenate([batch[1].numpy() for batch in merged]), data[:, 0])
    spoiled = data.copy()
    spoiled[17, 0] = np.inf
    with pytest.raises(ValueError, match="batch 3 of spoiled_set, sample 17"):
        list(executor.batches(tf.data.Dataset.from_tensor_slices((spoiled, spoiled)).batch(5), name="spoiled_set",
                              merge_rows=100))


def test_merged_batch_rows_from_the_models_layer_outputs(monkeypatch):
    """A functional model's layer outputs per sample are counted from their shapes (nested models included); the
    rows of a merged batch are the cap over three times the models' outputs; unknown outputs merge nothing."""
    # pylint: disable=import-outside-toplevel
    import keras
    from deel.influenciae.common import memory
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(4)])
    inputs = keras.Input((3, 2))
    flat = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(inner(flat)))
    # input 3·2, flatten 6, the nested model's output 4 and its layers 5 + 4, the last dense 2 (float32)
    assert memory.activation_bytes_per_sample(model) == 4 * (6 + 6 + 4 + 5 + 4 + 2)
    monkeypatch.setattr(memory, "MERGED_BATCH_BYTES", 3 * 108 * 2 * 10)
    assert memory.merged_batch_rows([model, model], 2 ** 40) == 10
    assert memory.merged_batch_rows([model, model], 16 * 3 * 108 * 2 * 4) == 4  # a sixteenth of the budget
    assert memory.activation_bytes_per_sample(keras.Sequential([keras.layers.Dense(2)])) is None  # never built

    class Subclassed(keras.Model):  # pylint: disable=abstract-method
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):  # pylint: disable=arguments-differ
            return self.dense(inputs)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), np.float32))
    assert memory.merged_batch_rows([model, subclassed], 2 ** 40) == 0
    sequences = keras.Input((None, 4))
    assert memory.merged_batch_rows([keras.Model(sequences, keras.layers.Dense(2)(sequences))], 2 ** 40) == 0


# Vector store ---------------------------------------------------------------------------------------------------
def test_vector_stores_hand_out_the_same_vectors(tmp_path):
    data = np.arange(22, dtype=np.float32).reshape(11, 2)
    dataset = tf.data.Dataset.from_tensor_slices((data, data[:, :1])).batch(4)

    def vectors(batch):
        return 3.0 * batch[0]

    def collected(store):
        return np.concatenate([chunk.numpy() for _, chunk in store.dataset()])

    memory = build_vector_store(CACHE.MEMORY, vectors, dataset, Executor(), lambda: True,
                                save_path=str(tmp_path / "saved"))
    assert isinstance(memory, MemoryVectorStore) and memory.size == 11
    np.testing.assert_array_equal(collected(memory), 3 * data)
    disk = build_vector_store(CACHE.DISK, vectors, dataset, Executor(), lambda: True,
                              load_path=str(tmp_path / "saved"))
    assert isinstance(disk, DiskVectorStore) and disk.size is None
    np.testing.assert_array_equal(collected(disk), 3 * data)
    np.testing.assert_array_equal(collected(build_vector_store(CACHE.NO_CACHE, vectors, dataset, Executor(),
                                                               lambda: True)), 3 * data)
    with pytest.warns(ResourceWarning, match="memory_budget_bytes"):
        over = build_vector_store(CACHE.MEMORY, vectors, dataset, Executor(memory_budget_bytes=8), lambda: False)
    np.testing.assert_array_equal(collected(over), 3 * data)
    with pytest.raises(TypeError, match="CACHE member"):
        build_vector_store("memory", vectors, dataset, Executor(), lambda: True)


# Curvature operators and the fit stage ----------------------------------------------------------------------------
class _MatrixOperator(CurvatureOperator):
    """A fixed symmetric matrix as a curvature operator (a stand-in for Gauss-Newton or Kronecker factors)."""

    def __init__(self, model, matrix):
        super().__init__(model)
        self.matrix = tf.constant(matrix, model.dtype)

    def matvec(self, vectors):
        return tf.matmul(self.matrix, tf.cast(vectors, self.dtype))

    def dense_sum(self):
        return tf.cast(self.matrix, tf.float64), 1


def test_hessian_operator_products_and_dense_sum_equal_the_closed_form(toy):
    operator = HessianOperator(toy["model"], toy["train"])
    total, count = operator.dense_sum()
    assert count == 25
    np.testing.assert_allclose(total.numpy() / count, toy["hessian"], rtol=1e-10)
    vectors = np.array([[1.0, -2.0], [0.5, 3.0]])
    np.testing.assert_allclose(operator.matvec(tf.constant(vectors)).numpy(), toy["hessian"] @ vectors, rtol=1e-10)


@pytest.mark.parametrize("solver", ["exact", "cgd", "lissa", "arnoldi"])
def test_a_given_curvature_operator_is_what_every_solver_inverts(toy, solver):
    matrix = np.array([[2.0, 0.3], [0.3, 1.0]])
    operator = _MatrixOperator(toy["model"], matrix)
    settings = {"exact": {}, "cgd": {"tol": 1e-12, "atol": 1e-14}, "lissa": {"scale": 5.0, "n_opt_iters": 2000},
                "arnoldi": {"subspace_dim": 2, "seed": 0}}[solver]
    solver_class = solver_registry.solver_entry(solver).solver_class
    instance = solver_class(toy["model"], train_dataset=None, regularization=LAMBDA, curvature=operator, **settings)
    vectors = np.array([[1.0, 0.0], [-1.0, 2.0]])
    damping = 1e-4 * 5.0 if solver == "lissa" else 0.0  # LiSSA's fixed point is (C + λI + d·s·I)⁻¹
    expected = np.linalg.solve(matrix + (LAMBDA + damping) * np.eye(2), vectors)
    np.testing.assert_allclose(instance.solve(tf.constant(vectors)).numpy(), expected, rtol=1e-6)


def test_fit_is_explicit_idempotent_and_run_by_the_first_product(toy):
    solver = ExactIHVP(toy["model"], toy["train"], regularization=LAMBDA, fit_now=False)
    assert not solver.is_fitted and solver.hessian is None
    np.testing.assert_allclose(solver.solve(tf.constant(toy["gradients"].T)).numpy(),
                               toy["inverse"] @ toy["gradients"].T, rtol=1e-8)
    assert solver.is_fitted
    hessian = solver.hessian
    assert solver.fit() is solver and solver.hessian is hessian
    np.testing.assert_allclose(solver.quadratic_form(tf.constant(toy["gradients"].T)).numpy(), toy["self"],
                               rtol=1e-8)
    assert solver.low_rank() is None


def test_arnoldi_low_rank_form_reconstructs_the_inverse(toy):
    solver = build_solver(ArnoldiConfig(regularization=LAMBDA, subspace_dim=2, seed=0), toy["model"], toy["train"])
    low_rank = solver.low_rank()
    basis = low_rank.basis.numpy()
    np.testing.assert_allclose(basis.T @ np.diag(low_rank.inverse_values.numpy()) @ basis, toy["inverse"],
                               rtol=1e-6)
    np.testing.assert_allclose(np.sort(low_rank.values.numpy()), np.linalg.eigvalsh(toy["hessian"]), rtol=1e-6)
    np.testing.assert_allclose(low_rank.project(tf.constant(toy["gradients"])).numpy(), toy["gradients"] @ basis.T,
                               rtol=1e-10)


# Registry ---------------------------------------------------------------------------------------------------------
def test_registry_lists_every_solver_and_builds_from_any_form(toy):
    assert set(solver_names()) >= {"exact", "cgd", "lissa", "arnoldi"}
    for entry in registered_solvers():
        assert dataclasses.is_dataclass(entry.config_class) and entry.description
        assert solver_registry.solver_entry(entry.name) is entry
    assert solver_registry.solver_entry("CG").name == "cgd"  # alias, case-insensitive
    configs = [ExactConfig(regularization=LAMBDA), "exact", ExactIHVP,
               ConjugateGradientConfig(regularization=LAMBDA, tol=1e-12, atol=1e-14)]
    for spec in configs:
        solver = build_solver(spec, toy["model"], toy["train"], regularization=LAMBDA)
        np.testing.assert_allclose(solver.solve(tf.constant(toy["gradients"][:3].T)).numpy(),
                                   toy["inverse"] @ toy["gradients"][:3].T, rtol=1e-6)
    instance = ExactIHVP(toy["model"], toy["train"])
    assert build_solver(instance, toy["model"], toy["train"]) is instance
    with pytest.raises(ValueError, match="one of"):
        build_solver("newton", toy["model"], toy["train"])
    with pytest.raises(TypeError, match="ihvp_calculator"):
        build_solver(3.5, toy["model"], toy["train"])


def test_factories_hold_a_configuration():
    factory = LissaIHVPFactory(n_opt_iters=7, scale=3.0, regularization=0.1)
    assert factory.config == LissaConfig(regularization=0.1, n_opt_iters=7, scale=3.0, extractor_layer=-1)
    assert factory.regularization == 0.1 and factory.n_cgd_iters == 7


@pytest.fixture(name="registered_double")
def _registered_double():
    @dataclasses.dataclass(frozen=True)
    class DoubledConfig(ExactConfig):
        """The exact solver registered again under another name."""

    class DoubledExact(ExactIHVP):
        """A registered copy of the exact solver."""

    entry = register_solver("doubled_exact", DoubledExact, DoubledConfig, aliases=("dbl",), description="test")
    yield entry
    for key in ("doubled_exact", "dbl"):
        solver_registry._REGISTRY.pop(key)  # pylint: disable=protected-access


def test_a_registered_solver_is_used_by_name_by_the_calculators(toy, registered_double):
    calculator = FirstOrderInfluenceCalculator(toy["model"], toy["train"], "dbl", regularization=LAMBDA)
    assert isinstance(calculator.ihvp_calculator, registered_double.solver_class)
    np.testing.assert_allclose(calculator.influence_matrix(toy["test"], toy["train"]).numpy(), toy["pairwise"],
                               rtol=1e-8)
    with pytest.raises(ValueError, match="already registered"):
        register_solver("dbl", ConjugateGradientDescentIHVP, ConjugateGradientConfig)
    with pytest.raises(TypeError, match="SolverConfig"):
        register_solver("other", ExactIHVP, dict)


# Compatibility shims --------------------------------------------------------------------------------------------
def test_earlier_names_warn_and_still_work(toy):
    with pytest.warns(DeprecationWarning, match="n_cgd_iters"):
        factory = CGDIHVPFactory(n_cgd_iters=9)
    assert factory.config.n_opt_iters == 9
    with pytest.raises(TypeError, match="both"):
        CGDIHVPFactory(n_cgd_iters=9, n_opt_iters=9)
    with pytest.warns(DeprecationWarning, match="train_set"):
        calculator = FirstOrderInfluenceCalculator(toy["model"], dataset=toy["train"], regularization=LAMBDA)
    with pytest.warns(DeprecationWarning, match="order"):
        result = next(iter(calculator.top_k(toy["test"], toy["train"], 2, ORDER.ASCENDING)))
    np.testing.assert_allclose(result[1].numpy(), np.sort(toy["pairwise"][:3], axis=1)[:, :2], rtol=1e-6)  # float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        FirstOrderInfluenceCalculator(toy["model"], train_set=toy["train"], regularization=LAMBDA)


# Public eager API -------------------------------------------------------------------------------------------------
def test_eager_api_equals_the_closed_form(toy):
    calculator = FirstOrderInfluenceCalculator(toy["model"], toy["train"], regularization=LAMBDA)
    self_values = calculator.self_influence(toy["train"])
    assert self_values.shape == (25,)
    np.testing.assert_allclose(self_values.numpy(), toy["self"], rtol=1e-8)
    np.testing.assert_allclose(calculator.influence_matrix(toy["test"], toy["train"]).numpy(), toy["pairwise"],
                               rtol=1e-8)
    for order, sign in ((ORDER.DESCENDING, -1), (ORDER.ASCENDING, 1)):
        best = calculator.influence_top_k(toy["test"], toy["train"], k=4, order=order, return_samples=True)
        assert isinstance(best, TopK) and best.indices.dtype == tf.int64
        expected = np.argsort(sign * toy["pairwise"], axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(best.indices.numpy(), expected)
        np.testing.assert_allclose(best.values.numpy(), np.take_along_axis(toy["pairwise"], expected, 1), rtol=1e-8)
        np.testing.assert_array_equal(best.samples.numpy(), toy["x"][expected])
        top_self = calculator.self_influence_top_k(toy["train"], k=3, order=order, return_samples=True)
        expected_self = np.argsort(sign * toy["self"], kind="stable")[:3]
        np.testing.assert_array_equal(top_self.indices.numpy(), expected_self)
        np.testing.assert_allclose(top_self.values.numpy(), toy["self"][expected_self], rtol=1e-8)
        np.testing.assert_array_equal(top_self.samples.numpy(), toy["x"][expected_self])
    assert calculator.influence_top_k(toy["test"], toy["train"], k=2).samples is None
    with pytest.raises(ValueError, match="k=26"):
        calculator.self_influence_top_k(toy["train"], k=26)
    with pytest.raises(ValueError, match="k=26"):
        calculator.influence_top_k(toy["test"], toy["train"], k=26)
    with pytest.raises(TypeError, match="ORDER"):
        calculator.influence_top_k(toy["test"], toy["train"], k=2, order="descending")


# Re-damping ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["exact", "cgd", "lissa", "arnoldi"])
def test_with_regularization_solves_the_new_damping_without_a_new_fit(toy, solver, monkeypatch):
    settings = {"exact": {}, "cgd": {"tol": 1e-12, "atol": 1e-14}, "lissa": {"scale": 5.0, "n_opt_iters": 3000},
                "arnoldi": {"subspace_dim": 2, "seed": 0}}[solver]
    solver_class = solver_registry.solver_entry(solver).solver_class
    original = solver_class(toy["model"], train_dataset=toy["train"], regularization=LAMBDA, **settings)
    vectors = np.array([[1.0, -2.0, 0.3], [0.5, 3.0, -1.0]])
    before = original.solve(tf.constant(vectors)).numpy()
    # Exact and Arnoldi must not pass over the data again: every curvature product / dense sum now fails.
    if solver in ("exact", "arnoldi"):
        def forbidden(*_args, **_kwargs):
            raise AssertionError("the re-damped solver went back to the curvature")
        monkeypatch.setattr(HessianOperator, "dense_sum", forbidden)
        monkeypatch.setattr(HessianOperator, "matvec", forbidden)
    new_damping = 0.4
    twin = original.with_regularization(new_damping)
    assert type(twin) is type(original) and twin.regularization == new_damping and twin.is_fitted
    expected = np.linalg.solve(toy["hessian"] + new_damping * np.eye(2), vectors)
    rtol = {"lissa": 1e-6}.get(solver, 1e-9)
    if solver == "lissa":  # LiSSA solves H + λI + d·s·I (damping d, scale s)
        expected = np.linalg.solve(toy["hessian"] + (new_damping + twin.damping * twin.scale) * np.eye(2), vectors)
    np.testing.assert_allclose(twin.solve(tf.constant(vectors)).numpy(), expected, rtol=rtol, atol=1e-10)
    # The original still solves its own damping.
    assert original.regularization == LAMBDA
    np.testing.assert_allclose(original.solve(tf.constant(vectors)).numpy(), before, rtol=1e-12)
    with pytest.raises(ValueError, match="regularization"):
        original.with_regularization(-1.0)


def test_with_regularization_of_an_unfitted_solver_fits_on_first_use(toy):
    solver = ExactIHVP(toy["model"], toy["train"], regularization=LAMBDA, fit_now=False)
    twin = solver.with_regularization(0.2)
    assert not twin.is_fitted
    vectors = np.array([[1.0], [2.0]])
    np.testing.assert_allclose(twin.solve(tf.constant(vectors)).numpy(),
                               np.linalg.solve(toy["hessian"] + 0.2 * np.eye(2), vectors), rtol=1e-9)
    assert not solver.is_fitted


def test_dense_hessian_from_products_equals_the_batchwise_jacobian_and_closed_form(monkeypatch):
    """Large models form the dense Hessian from Hessian-vector products on blocks of unit vectors; forced here on
    the toy model (every layer: P = 8) with blocks of 3 columns (the last block is partial)."""
    from deel.influenciae.common import curvature  # pylint: disable=import-outside-toplevel
    model = toy_model("float64")
    x, y = toy_data(dtype=np.float64)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    expected = toy_mean_hessian_all_layers(model, x, y)
    batchwise, count = HessianOperator(influence_model, toy_dataset(x, y, 4)).dense_sum()
    monkeypatch.setattr(curvature, "DENSE_BY_PRODUCTS_MIN_PARAMS", 1)
    monkeypatch.setattr(curvature, "DENSE_COLUMN_BLOCK", 3)
    by_products, count_products = HessianOperator(influence_model, toy_dataset(x, y, 4)).dense_sum()
    assert count == count_products == len(x)
    np.testing.assert_allclose(by_products.numpy(), batchwise.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(by_products.numpy() / count, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_scipy", [True, False])
def test_exact_solver_on_an_indefinite_damped_hessian_uses_lu_and_the_true_inverse(monkeypatch, use_scipy):
    from deel.influenciae.utils.linear_algebra import LUFactor  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(LUFactor, "use_scipy", use_scipy)
    model = toy_model("float64")
    x, y = toy_data(dtype=np.float64)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    hessian = toy_mean_hessian_all_layers(model, x, y)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues[0] < -1e-3  # the toy's full Hessian is indefinite
    damping = 0.5 * abs(eigenvalues[0])  # H + λI stays indefinite and nonsingular
    assert np.min(np.abs(eigenvalues + damping)) > 1e-4
    solver = ExactIHVP(influence_model, toy_dataset(x, y, 4), regularization=10.0)
    assert solver.lu_factor is None and solver.cholesky_factor is not None
    twin = solver.with_regularization(damping)
    assert twin.lu_factor is not None and twin.cholesky_factor is None
    vectors = np.random.default_rng(0).normal(size=(8, 3))
    expected = np.linalg.solve(hessian + damping * np.eye(8), vectors)
    np.testing.assert_allclose(twin.solve(tf.constant(vectors)).numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(twin.inv_hessian.numpy(), np.linalg.inv(hessian + damping * np.eye(8)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(twin.quadratic_form(tf.constant(vectors)).numpy(),
                               np.einsum("pk,pk->k", vectors, expected), rtol=1e-4)
    compiled = tf.function(twin.solve)  # the solve also works inside a graph
    np.testing.assert_allclose(compiled(tf.constant(vectors)).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_spectral_redamping_reuses_one_eigendecomposition(monkeypatch):
    from deel.influenciae.common import exact_ihvp  # pylint: disable=import-outside-toplevel
    calls = []
    original_eigh = exact_ihvp.symmetric_eigh
    monkeypatch.setattr(exact_ihvp, "symmetric_eigh", lambda matrix: calls.append(1) or original_eigh(matrix))
    model = toy_model("float64")
    x, y = toy_data(dtype=np.float64)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=toy_mse("float64"))
    hessian = toy_mean_hessian_all_layers(model, x, y)
    solver = ExactIHVP(influence_model, toy_dataset(x, y, 4), regularization=0.0)  # λ = 0: pseudo-inverse
    vectors = np.random.default_rng(1).normal(size=(8, 2))
    np.testing.assert_allclose(solver.solve(tf.constant(vectors)).numpy(),
                               np.linalg.pinv(hessian, rcond=1e-10) @ vectors, rtol=1e-4, atol=1e-6)
    damping = 0.3 * abs(np.linalg.eigvalsh(hessian)[0])  # indefinite: the cached spectrum is used, not LU
    twin = solver.with_regularization(damping)
    assert twin.lu_factor is None and twin.cholesky_factor is None
    np.testing.assert_allclose(twin.solve(tf.constant(vectors)).numpy(),
                               np.linalg.solve(hessian + damping * np.eye(8), vectors), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(twin.inv_hessian.numpy(), np.linalg.inv(hessian + damping * np.eye(8)), rtol=1e-4,
                               atol=1e-6)
    assert len(calls) == 1
    # With λ > 0, directions whose |e + λ| is below the pseudo-inverse's cut-off (rcond · max) but far above the
    # rounding are inverted, as a fresh (LU) solver does: they are what the damping is for.
    coarse = ExactIHVP(influence_model, toy_dataset(x, y, 4), regularization=0.0, rcond=0.05)
    spectrum = np.linalg.eigvalsh(hessian)
    damping = 0.02 * np.max(np.abs(spectrum))
    shifted = np.abs(spectrum + damping)
    assert shifted.min() < coarse.rcond * shifted.max() and shifted.min() > 1e-6 * shifted.max()
    expected = np.linalg.solve(hessian + damping * np.eye(8), vectors)
    np.testing.assert_allclose(coarse.with_regularization(damping).solve(tf.constant(vectors)).numpy(), expected,
                               rtol=1e-4, atol=1e-6)
