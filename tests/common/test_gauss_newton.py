"""The Gauss–Newton curvature against ``Σ_i J_iᵀ H_i J_i`` built densely in float64 from explicit per-sample output
Jacobians (``tf.GradientTape.jacobian``, one sample at a time) and closed-form output Hessians (softmax
cross-entropy on logits: ``diag(p) - p pᵀ``; mean squared error over C outputs: ``2/C I``; both times the sample
weight), and the ``curvature="gauss_newton"`` choice of every solver against ``np.linalg.solve``."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (ArnoldiConfig, ArnoldiIHVP, ConjugateGradientConfig, ConjugateGradientDescentIHVP,
                                     ExactConfig, ExactIHVP, FisherOperator, HessianOperator, InfluenceModel,
                                     LissaConfig, LissaIHVP, build_solver)
from deel.influenciae.common.gauss_newton import (CURVATURE_CHOICES, GaussNewtonOperator, check_curvature,
                                                  resolve_curvature)
from deel.influenciae.influence import FirstOrderInfluenceCalculator

N_SAMPLES, N_CLASSES, BATCH = 11, 4, 4


def _cross_entropy():
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")


def _mse():
    return keras.losses.MeanSquaredError(reduction="none", dtype="float64")


def _tanh_mlp(loss: str, weighted: bool = False, frozen_first_layer: bool = False, seed: int = 0):
    """A float64 tanh MLP (3 → [6 tanh, not watched] → 5 tanh → 4), its influence model over the watched layers, a
    batched dataset of (x, y[, w]) and the arrays."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, 3))
    if loss == "cross_entropy":
        y = np.eye(N_CLASSES)[rng.integers(0, N_CLASSES, size=N_SAMPLES)]
    else:
        y = rng.normal(size=(N_SAMPLES, N_CLASSES))
    weights = rng.uniform(0.5, 2.0, size=N_SAMPLES) if weighted else None
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,), dtype="float64")]
    if frozen_first_layer:
        layers.append(keras.layers.Dense(6, activation="tanh", dtype="float64"))
    layers += [keras.layers.Dense(5, activation="tanh", dtype="float64"),
               keras.layers.Dense(N_CLASSES, dtype="float64")]
    model = keras.Sequential(layers)
    loss_function = _cross_entropy() if loss == "cross_entropy" else _mse()
    influence_model = InfluenceModel(model, start_layer=1 if frozen_first_layer else 0, last_layer=-1,
                                     loss_function=loss_function)
    arrays = (x, y) if weights is None else (x, y, weights)
    dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH)
    return influence_model, dataset, x, y, weights


def _explicit_gauss_newton(influence_model, x, weights, loss):
    """``Σ_i J_iᵀ H_i J_i`` (P, P) in float64: J_i from a tape per sample, H_i in closed form."""
    model = influence_model.model
    total = np.zeros((influence_model.nb_params, influence_model.nb_params))
    for index, x_i in enumerate(x):
        with tf.GradientTape() as tape:
            outputs = model(x_i[None])[0]
        jacobian = tape.jacobian(outputs, [weight.value for weight in influence_model.weights])
        flat = np.concatenate([part.numpy().reshape(N_CLASSES, -1) for part in jacobian], axis=1)  # (C, P)
        if loss == "cross_entropy":
            p_i = tf.nn.softmax(outputs).numpy()
            output_hessian = np.diag(p_i) - np.outer(p_i, p_i)
        else:
            output_hessian = 2.0 / N_CLASSES * np.eye(N_CLASSES)
        if weights is not None:
            output_hessian = weights[index] * output_hessian
        total += flat.T @ output_hessian @ flat
    return total


CASES = [("cross_entropy", False), ("cross_entropy", True), ("mse", False), ("mse", True)]


@pytest.mark.parametrize("loss, weighted", CASES, ids=[f"{loss}{'-weighted' if w else ''}" for loss, w in CASES])
def test_products_and_dense_sum_equal_explicit_jacobians(loss, weighted):
    """Dense sum and products (several columns, one column) against the explicit sum; positive semi-definite."""
    influence_model, dataset, x, _, weights = _tanh_mlp(loss, weighted)
    expected = _explicit_gauss_newton(influence_model, x, weights, loss)
    operator = GaussNewtonOperator(influence_model, dataset)
    total, count = operator.dense_sum()
    assert count == N_SAMPLES and total.dtype == tf.float64
    scale = np.abs(expected).max()
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-9, atol=1e-12 * scale)
    vectors = np.random.default_rng(3).normal(size=(influence_model.nb_params, 3))
    mean_products = expected @ vectors / N_SAMPLES
    assert operator.in_memory
    np.testing.assert_allclose(operator.matvec(tf.constant(vectors)).numpy(), mean_products, rtol=1e-9,
                               atol=1e-12 * scale)
    np.testing.assert_allclose(operator.matvec(tf.constant(vectors[:, 0])).numpy()[:, 0], mean_products[:, 0],
                               rtol=1e-9, atol=1e-12 * scale)
    # positive semi-definite: every H_i is (convex losses in the outputs, positive sample weights)
    eigenvalues = np.linalg.eigvalsh(total.numpy())
    assert eigenvalues.min() >= -1e-6 * eigenvalues.max()


def test_streamed_products_and_dense_sum_in_steps_of_one_sample():
    """Above the memory budget the products stream the batches, and the dense sum takes as many samples per step
    as the budget allows (here one: a batch of 4 is split) or refuses."""
    influence_model, dataset, x, _, weights = _tanh_mlp("cross_entropy", weighted=True)
    expected = _explicit_gauss_newton(influence_model, x, weights, "cross_entropy")
    nb_params = influence_model.nb_params
    vectors = np.random.default_rng(4).normal(size=(nb_params, 2))
    streamed = GaussNewtonOperator(influence_model, dataset, memory_budget_bytes=100)
    assert not streamed.in_memory and streamed.samples is None
    np.testing.assert_allclose(streamed.matvec(tf.constant(vectors)).numpy(), expected @ vectors / N_SAMPLES,
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        streamed.dense_sum()
    one_per_step = nb_params ** 2 * 32 + 4 * N_CLASSES * nb_params * 8  # the float64 sums, one sample's Jacobians
    stepped = GaussNewtonOperator(influence_model, dataset, memory_budget_bytes=one_per_step)
    total, _ = stepped.dense_sum()
    assert stepped.memory_estimate_bytes == one_per_step
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_structured_outputs_of_several_shapes():
    """Two outputs, (B, 2) and (B, 2, 3), and a plain callable loss on both: C = 8 flattened outputs, H_i = 2I."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 3))
    targets = (rng.normal(size=(7, 2)), rng.normal(size=(7, 2, 3)))
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,), dtype="float64")
    hidden = keras.layers.Dense(4, activation="tanh", dtype="float64")(inputs)
    first = keras.layers.Dense(2, dtype="float64")(hidden)
    second = keras.layers.Reshape((2, 3), dtype="float64")(keras.layers.Dense(6, dtype="float64")(hidden))
    model = keras.Model(inputs, [first, second])

    def loss_function(y_true, y_pred):
        return (tf.reduce_sum((y_pred[0] - y_true[0]) ** 2, axis=1)
                + tf.reduce_sum((y_pred[1] - y_true[1]) ** 2, axis=[1, 2]))

    influence_model = InfluenceModel(model, start_layer=1, last_layer=-1, loss_function=loss_function)
    watched = [weight.value for weight in influence_model.weights]
    expected = np.zeros((influence_model.nb_params, influence_model.nb_params))
    for x_i in x:
        with tf.GradientTape() as tape:
            outputs = tf.concat([tf.reshape(part, [-1]) for part in model(x_i[None])], axis=0)
        flat = np.concatenate([part.numpy().reshape(8, -1) for part in tape.jacobian(outputs, watched)], axis=1)
        expected += 2.0 * flat.T @ flat
    dataset = tf.data.Dataset.from_tensor_slices((x, targets)).batch(3)
    operator = GaussNewtonOperator(influence_model, dataset)
    np.testing.assert_allclose(operator.dense_sum()[0].numpy(), expected, rtol=1e-9, atol=1e-12)
    vectors = rng.normal(size=(influence_model.nb_params, 2))
    np.testing.assert_allclose(operator.matvec(tf.constant(vectors)).numpy(), expected @ vectors / 7, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_softmax_cross_entropy_gauss_newton_is_the_true_fisher(sparse):
    """Softmax cross-entropy on logits, one-hot or sparse labels: G is FisherOperator(kind="true")."""
    influence_model, dataset, x, y, _ = _tanh_mlp("cross_entropy")
    if sparse:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")
        influence_model = InfluenceModel(influence_model.model, start_layer=0, last_layer=-1, loss_function=loss)
        dataset = tf.data.Dataset.from_tensor_slices((x, y.argmax(axis=1))).batch(BATCH)
    fisher, fisher_count = FisherOperator(influence_model, dataset, kind="true").dense_sum()
    gauss_newton, count = GaussNewtonOperator(influence_model, dataset).dense_sum()
    assert count == fisher_count == N_SAMPLES
    np.testing.assert_allclose(gauss_newton.numpy(), fisher.numpy(), rtol=1e-9, atol=1e-13)


def _non_convex_problem():
    """The tanh MLP with an unwatched first layer, its dense float64 mean Gauss–Newton matrix G and Hessian H, and
    seeded vectors; H + λI is indefinite for λ = 1e-3 while G + λI is positive definite."""
    influence_model, dataset, x, _, weights = _tanh_mlp("cross_entropy", frozen_first_layer=True, seed=2)
    gauss_newton = _explicit_gauss_newton(influence_model, x, weights, "cross_entropy") / N_SAMPLES
    hessian_sum, count = HessianOperator(influence_model, dataset).dense_sum()
    hessian = hessian_sum.numpy() / count
    vectors = np.random.default_rng(6).normal(size=(influence_model.nb_params, 3))
    return influence_model, dataset, gauss_newton, 0.5 * (hessian + hessian.T), vectors


LAMBDA = 1e-3


def test_conjugate_gradients_converge_on_gauss_newton_where_the_hessian_is_indefinite():
    """H + λI indefinite: block CG on it stops; CG (block and column-wise) on G + λI converges to the dense solve."""
    influence_model, dataset, gauss_newton, hessian, vectors = _non_convex_problem()
    identity = np.eye(len(hessian))
    assert np.linalg.eigvalsh(hessian + LAMBDA * identity).min() < 0  # CG on H + λI has no guarantee
    assert np.linalg.eigvalsh(gauss_newton + LAMBDA * identity).min() > 0
    with pytest.raises(ValueError, match="not positive definite"):  # block CG on the Hessian stops
        ConjugateGradientDescentIHVP(influence_model, train_dataset=dataset, regularization=LAMBDA, n_opt_iters=500,
                                     tol=1e-10, atol=1e-14).solve(tf.constant(vectors))
    expected = np.linalg.solve(gauss_newton + LAMBDA * identity, vectors)
    for block in (True, False):
        solver = ConjugateGradientDescentIHVP(influence_model, train_dataset=dataset, regularization=LAMBDA,
                                              n_opt_iters=500, tol=1e-10, atol=1e-14, block=block,
                                              curvature="gauss_newton")
        assert isinstance(solver.curvature, GaussNewtonOperator)
        assert solver.curvature.model is solver.head_model  # on the cached inputs of the head
        solution = solver.solve(tf.constant(vectors)).numpy()
        np.testing.assert_allclose(solution, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        if block:
            assert float(tf.reduce_max(solver.last_solve_info["residual_norm"])) <= 1e-10 * np.linalg.norm(
                vectors, axis=0).max()
        np.testing.assert_allclose(solver.apply_hessian(tf.constant(vectors)).numpy(), gauss_newton @ vectors,
                                   rtol=1e-9, atol=1e-12)


def test_exact_lissa_and_arnoldi_accept_gauss_newton():
    """Exact (a Cholesky factor of G + λI), LiSSA and Arnoldi (k = m = P) against the dense float64 solves."""
    influence_model, dataset, gauss_newton, _, vectors = _non_convex_problem()
    identity = np.eye(len(gauss_newton))
    eigenvalues = np.linalg.eigvalsh(gauss_newton)
    exact = ExactIHVP(influence_model, dataset, regularization=LAMBDA, curvature="gauss_newton")
    assert isinstance(exact.curvature, GaussNewtonOperator) and exact.cholesky_factor is not None
    np.testing.assert_allclose(exact.hessian.numpy(), gauss_newton, rtol=1e-9, atol=1e-13)
    expected = np.linalg.solve(gauss_newton + LAMBDA * identity, vectors)
    np.testing.assert_allclose(exact.solve(tf.constant(vectors)).numpy(), expected, rtol=1e-6)
    # LiSSA converges like (1 - μ/s)ⁿ: a larger λ keeps μ/s = 1/12 and 400 iterations reach 1e-15
    lissa_lambda = 0.1 * eigenvalues.max()
    lissa = LissaIHVP(influence_model, train_dataset=dataset, n_opt_iters=400, damping=0.0,
                      scale=1.2 * (eigenvalues.max() + lissa_lambda), regularization=lissa_lambda,
                      curvature="gauss_newton")
    np.testing.assert_allclose(lissa.solve(tf.constant(vectors)).numpy(),
                               np.linalg.solve(gauss_newton + lissa_lambda * identity, vectors), rtol=1e-6)
    nb_params = influence_model.nb_params
    arnoldi = ArnoldiIHVP(influence_model, dataset, subspace_dim=nb_params, k_largest_eig_vals=nb_params,
                          regularization=LAMBDA, curvature="gauss_newton")
    np.testing.assert_allclose(np.sort(arnoldi.eig_vals.numpy()), eigenvalues, rtol=1e-6,
                               atol=1e-9 * eigenvalues.max())
    np.testing.assert_allclose(arnoldi.solve(tf.constant(vectors)).numpy(), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_solver_configurations_and_calculators_take_the_curvature():
    """``curvature`` is a field of every solver configuration (default "hessian"), also through a calculator."""
    influence_model, dataset, gauss_newton, _, vectors = _non_convex_problem()
    nb_params = influence_model.nb_params
    expected = np.linalg.solve(gauss_newton + LAMBDA * np.eye(nb_params), vectors)
    configs = [ExactConfig(regularization=LAMBDA, curvature="gauss_newton"),
               ConjugateGradientConfig(regularization=LAMBDA, n_opt_iters=500, tol=1e-10, atol=1e-14,
                                       curvature="gauss_newton"),
               ArnoldiConfig(regularization=LAMBDA, subspace_dim=nb_params, curvature="gauss_newton")]
    for config in configs:
        solver = build_solver(config, influence_model, dataset)
        assert isinstance(solver.curvature, GaussNewtonOperator), type(config).__name__
        np.testing.assert_allclose(solver.solve(tf.constant(vectors)).numpy(), expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())
    lissa = build_solver(LissaConfig(curvature="gauss_newton"), influence_model, dataset, fit_now=False).fit()
    assert isinstance(lissa.curvature, GaussNewtonOperator)
    assert isinstance(build_solver(LissaConfig(), influence_model, dataset).curvature, HessianOperator)
    assert ExactConfig().curvature == ConjugateGradientConfig().curvature == "hessian"
    calculator = FirstOrderInfluenceCalculator(
        influence_model, dataset,
        ihvp_calculator=ConjugateGradientConfig(regularization=LAMBDA, curvature="gauss_newton"))
    assert isinstance(calculator.ihvp_calculator.curvature, GaussNewtonOperator)


def test_the_hessian_stays_the_default():
    """None, "hessian" (any case) and no argument all give the Hessian operators of before."""
    influence_model, dataset, _, hessian, _ = _non_convex_problem()
    for curvature in (None, "hessian", "Hessian"):
        exact = ExactIHVP(influence_model, dataset, regularization=LAMBDA, curvature=curvature)
        assert isinstance(exact.curvature, HessianOperator)
        np.testing.assert_allclose(exact.hessian.numpy(), hessian, rtol=1e-9, atol=1e-13)
        iterative = ConjugateGradientDescentIHVP(influence_model, train_dataset=dataset, regularization=LAMBDA,
                                                 curvature=curvature)
        assert isinstance(iterative.curvature, HessianOperator)
        assert ArnoldiIHVP(influence_model, dataset, subspace_dim=2, curvature=curvature,
                           fit_now=False).curvature.__class__ is HessianOperator
    assert resolve_curvature("hessian", influence_model, dataset) is None


def test_bad_curvature_values():
    """Unknown names: ValueError naming ``curvature`` and the choices; other types: TypeError; no dataset."""
    influence_model, dataset, *_ = _tanh_mlp("mse")
    assert check_curvature(None) == "hessian" and check_curvature("Gauss_Newton") == "gauss_newton"
    assert CURVATURE_CHOICES == ("hessian", "gauss_newton")
    for build in (lambda value: ExactIHVP(influence_model, dataset, curvature=value),
                  lambda value: ConjugateGradientDescentIHVP(influence_model, train_dataset=dataset, curvature=value),
                  lambda value: LissaIHVP(influence_model, train_dataset=dataset, curvature=value),
                  lambda value: ArnoldiIHVP(influence_model, dataset, subspace_dim=2, curvature=value),
                  lambda value: build_solver(ExactConfig(curvature=value), influence_model, dataset)):
        with pytest.raises(ValueError, match=r"curvature must be one of \('hessian', 'gauss_newton'\).*'fisher'"):
            build("fisher")
        with pytest.raises(TypeError, match="curvature must be one of"):
            build(3)
    with pytest.raises(ValueError, match="needs a train_dataset"):
        ArnoldiIHVP(influence_model, None, curvature="gauss_newton")
    with pytest.raises(ValueError, match="needs a train_dataset"):
        resolve_curvature("gauss_newton", influence_model, None)
    with pytest.raises(ValueError, match="batched"):
        GaussNewtonOperator(influence_model, dataset.unbatch())
