"""TRAK against a NumPy implementation of its formula (float64 per-sample gradients, explicit projection matrix)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, GradientProjector
from deel.influenciae.trak import TRAK, margin_loss
from deel.influenciae.trak.trak import _cholesky
from deel.influenciae.utils import ORDER
from tests.per_sample import tape_gradients

F64 = "float64"
N_TRAIN, N_TEST, DIM = 23, 7, 12


def _cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype=F64)


def _model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,), dtype=F64), keras.layers.Dense(5, activation="tanh", dtype=F64),
                             keras.layers.Dense(3, dtype=F64)])


@pytest.fixture(name="problem", scope="module")
def fixture_problem():
    rng = np.random.default_rng(0)
    x_train, y_train = rng.normal(size=(N_TRAIN, 4)), rng.integers(0, 3, size=N_TRAIN)
    x_test, y_test = rng.normal(size=(N_TEST, 4)), rng.integers(0, 3, size=N_TEST)
    models = [_model(1), _model(2)]
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(5)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3)
    return {"models": models, "train": train, "test": test, "x_train": x_train, "y_train": y_train,
            "x_test": x_test, "y_test": y_test}


def _numpy_trak(problem, loss, projector, regularization, heuristic, reweight):
    """Pairwise (T, N) and self-influence (N,) of the TRAK formula in NumPy."""
    pairwise, self_values, dampings = 0.0, 0.0, []
    for model in problem["models"]:
        g_train = tape_gradients(model, loss, problem["x_train"], problem["y_train"])
        g_test = tape_gradients(model, loss, problem["x_test"], problem["y_test"])
        matrix = projector.matrix(g_train.shape[1]).numpy()
        phi_train, phi_test = g_train @ matrix, g_test @ matrix
        gram = phi_train.T @ phi_train / N_TRAIN
        damping = regularization + (0.0 if heuristic is None else heuristic * np.linalg.eigvalsh(gram).mean())
        dampings.append(damping)
        inverse = np.linalg.inv(gram + damping * np.eye(DIM))
        losses = np.array([float(loss(y[None], model(x[None]))[0]) for x, y in
                           zip(problem["x_train"], problem["y_train"])])
        weights = {None: np.ones(N_TRAIN), "cross_entropy": 1 - np.exp(-losses),
                   "margin": 1 / (1 + np.exp(-losses))}[reweight]
        pairwise = pairwise + phi_test @ inverse @ (phi_train * weights[:, None]).T
        self_values = self_values + weights * np.einsum("nd,de,ne->n", phi_train, inverse, phi_train)
    count = len(problem["models"])
    return pairwise / count, self_values / count, dampings


@pytest.mark.parametrize("loss_name,reweight,heuristic", [("cross_entropy", None, 0.1),
                                                          ("cross_entropy", "cross_entropy", None),
                                                          ("margin", "margin", 0.5)])
def test_trak_equals_the_numpy_formula(problem, loss_name, reweight, heuristic):
    loss = _cross_entropy() if loss_name == "cross_entropy" else margin_loss
    influence_models = [BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)
                        for model in problem["models"]]
    projector = GradientProjector(DIM, seed=3)
    regularization = 1e-2 if heuristic is None else 0.0
    trak = TRAK(influence_models, problem["train"], projector, regularization=regularization,
                damping_heuristic=heuristic, reweight=reweight)
    pairwise, self_values, dampings = _numpy_trak(problem, loss, projector, regularization, heuristic, reweight)
    np.testing.assert_allclose(trak.dampings, dampings, rtol=1e-6)
    scale = np.abs(pairwise).max()
    np.testing.assert_allclose(trak.influence_matrix(problem["test"], problem["train"]), pairwise, rtol=1e-6,
                               atol=1e-6 * scale)
    np.testing.assert_allclose(trak.self_influence(problem["train"]), self_values, rtol=1e-6)
    top = trak.influence_top_k(problem["test"], problem["train"], k=4, order=ORDER.DESCENDING)
    np.testing.assert_array_equal(top.indices, np.argsort(-pairwise, axis=1, kind="stable")[:, :4])
    # Groups: sums of the pairwise values (TRAK is additive).
    group = trak.estimate_influence_values_group(problem["train"].take(2), problem["test"])
    np.testing.assert_allclose(group.numpy(), [[pairwise[:, :10].sum()]], rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(trak.estimate_influence_values_group(problem["train"]).numpy(),
                               [[trak.influence_matrix(problem["train"], problem["train"]).numpy().sum()]],
                               rtol=1e-6)
    # Re-damping reuses the fitted kernels.
    redamped = trak.with_regularization(0.3)
    expected, _, _ = _numpy_trak(problem, loss, projector, 0.3, None, reweight)
    np.testing.assert_allclose(redamped.influence_matrix(problem["test"], problem["train"]), expected, rtol=1e-6,
                               atol=1e-6 * np.abs(expected).max())


def test_margin_loss_is_minus_the_log_odds_of_the_label():
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(6, 4)), rng.integers(0, 4, size=6)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    correct = probabilities[np.arange(6), labels]
    expected = -np.log(correct / (1 - correct))
    np.testing.assert_allclose(margin_loss(labels, logits), expected, rtol=1e-10)
    np.testing.assert_allclose(margin_loss(np.eye(4)[labels], logits), expected, rtol=1e-10)


def test_trak_arguments_are_checked(problem):
    model = problem["models"][0]
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
    with pytest.raises(ValueError, match="reweight"):
        TRAK(influence_model, problem["train"], GradientProjector(4), reweight="softmax")
    with pytest.raises(ValueError, match="regularization"):
        TRAK(influence_model, problem["train"], GradientProjector(4), regularization=-1.0)
    with pytest.raises(TypeError, match="projector"):
        TRAK(influence_model, problem["train"], projector=16)
    with pytest.raises(ValueError, match="at least one model"):
        TRAK([], problem["train"])
    with pytest.raises(ValueError, match="batched"):
        TRAK(influence_model, problem["train"].unbatch(), GradientProjector(4))
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        TRAK(influence_model, problem["train"], GradientProjector(4096), memory_budget_bytes=2 ** 20)


def test_an_index_of_trak_answers_like_trak_and_refuses_another_projection(problem, tmp_path):
    from deel.influenciae.common import InfluenceIndex  # pylint: disable=import-outside-toplevel
    influence_models = [BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
                        for model in problem["models"]]
    trak = TRAK(influence_models, problem["train"], GradientProjector(DIM, seed=3))
    index = trak.build_index(problem["train"], str(tmp_path / "trak"), dtype="float32", shard_size=10)
    expected = trak.influence_top_k(problem["test"], problem["train"], k=5)
    loaded = InfluenceIndex.load(str(tmp_path / "trak"), trak)
    for answer in (index.top_k(problem["test"], k=5), loaded.top_k(problem["test"], k=5)):
        np.testing.assert_array_equal(answer.indices, expected.indices)
        np.testing.assert_allclose(answer.values, expected.values, rtol=1e-6)
    other = TRAK(influence_models, problem["train"], GradientProjector(DIM, seed=4))
    with pytest.raises(ValueError, match="another"):
        InfluenceIndex.load(str(tmp_path / "trak"), other)
    # λ only enters the test side: the index serves another damping of the same fit.
    redamped = trak.with_regularization(0.5)
    np.testing.assert_array_equal(InfluenceIndex.load(str(tmp_path / "trak"), redamped).top_k(problem["test"], k=5)
                                  .indices, redamped.influence_top_k(problem["test"], problem["train"], k=5).indices)


def test_a_saved_fit_answers_without_a_pass_and_refuses_other_models(problem, tmp_path):
    influence_models = [BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
                        for model in problem["models"]]
    trak = TRAK(influence_models, problem["train"], GradientProjector(DIM, seed=3), regularization=0.01,
                reweight="cross_entropy")
    trak.save(str(tmp_path / "trak.npz"))
    loaded = TRAK.load(str(tmp_path / "trak.npz"), influence_models)
    assert loaded.dampings == trak.dampings and loaded.reweight == "cross_entropy"
    np.testing.assert_allclose(loaded.influence_matrix(problem["test"], problem["train"]),
                               trak.influence_matrix(problem["test"], problem["train"]), rtol=1e-12)
    with pytest.raises(ValueError, match="other models"):
        TRAK.load(str(tmp_path / "trak.npz"), influence_models[::-1])
    with pytest.raises(ValueError, match="other models"):
        TRAK.load(str(tmp_path / "trak.npz"), influence_models[:1])
    with pytest.raises(FileNotFoundError):
        TRAK.load(str(tmp_path / "missing.npz"), influence_models)


def test_trak_in_float32_with_the_hadamard_projection_matches_the_numpy_formula(problem):
    """A float32 model projected by the SRHT: the features and each batch's ΦᵀΦ in float32 (the sum over batches in
    float64), against the float64 formula on the same gradients: 1e-4 relative."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    single = dict(problem, models=[model], x_train=problem["x_train"].astype("float32"),
                  x_test=problem["x_test"].astype("float32"))
    train = tf.data.Dataset.from_tensor_slices((single["x_train"], problem["y_train"])).batch(5)
    test = tf.data.Dataset.from_tensor_slices((single["x_test"], problem["y_test"])).batch(3)
    projector = GradientProjector(DIM, seed=3, kind="srht")
    trak = TRAK([BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)], train, projector,
                regularization=1e-2, damping_heuristic=None)
    pairwise, self_values, _ = _numpy_trak(single, loss, projector, 1e-2, None, None)
    scale = np.abs(pairwise).max()
    np.testing.assert_allclose(trak.influence_matrix(test, train), pairwise, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(trak.self_influence(train), self_values, rtol=1e-4)


def test_solve_dtype_of_the_kernels(problem):
    """float64 solves of a float32 model agree with the default float32 ones; a kernel float32 cannot factorise is
    factorised in float64; other dtypes are refused."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((problem["x_train"].astype("float32"), problem["y_train"])).batch(5)
    single = TRAK([influence_model], train, GradientProjector(DIM, seed=3))
    double = TRAK([influence_model], train, GradientProjector(DIM, seed=3), solve_dtype=tf.float64)
    assert single.solve_dtype == tf.float32 and double.solve_dtype == tf.float64
    assert single._solvers[0][1].dtype == tf.float32 and double._solvers[0][1].dtype == tf.float64  # pylint: disable=W0212
    values = double.influence_matrix(train, train).numpy()
    np.testing.assert_allclose(single.influence_matrix(train, train).numpy(), values, rtol=1e-4,
                               atol=1e-4 * np.abs(values).max())
    nearly_singular = np.array([[1.0, 1.0], [1.0, 1.0 + 1e-9]])
    factor = _cholesky(nearly_singular, np.float32)
    assert factor.dtype == np.float64
    np.testing.assert_allclose(factor, np.linalg.cholesky(nearly_singular))
    with pytest.raises(ValueError, match="solve_dtype"):
        TRAK([influence_model], train, GradientProjector(DIM, seed=3), solve_dtype=tf.float16)
