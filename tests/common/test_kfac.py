"""K-FAC and EK-FAC against brute-force ground truth in float64: factors from closed-form layer inputs and output
gradients, an explicit im2col, per-sample gradients from GradientTape, and the block-diagonal (A ⊗ S + λI)⁻¹
built densely."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (BaseInfluenceModel, CompressedQueries, EKFACIHVP, KFACConfig, KFACIHVP,
                                     build_solver)

from deel.influenciae.common import layer_adapters
from deel.influenciae.influence import FirstOrderInfluenceCalculator

F64 = "float64"


def _cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype=F64)


def _mlp(seed: int = 0, samples: int = 37):
    """A tanh MLP 4 -> 5 -> 3 (softmax cross-entropy), every weight watched, and its data."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((4,), dtype=F64), keras.layers.Dense(5, activation="tanh", dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    x, y = rng.normal(size=(samples, 4)), rng.integers(0, 3, size=samples)
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), x, y, model


def _mlp_factors(model, x, y):
    """Closed-form rows (with the homogeneous 1) and output gradients of both layers: [(a (N, in+1), δ (N, out))]."""
    w1, b1, w2, b2 = model.get_weights()
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    delta2 = probabilities - np.eye(3)[y]
    delta1 = (delta2 @ w2.T) * (1 - hidden ** 2)
    ones = np.ones((len(x), 1))
    return [(np.hstack([x, ones]), delta1), (np.hstack([hidden, ones]), delta2)]


def _per_sample_gradients(influence_model, x, y):
    """(N, P) per-sample gradients, one GradientTape per sample (float64)."""
    rows = []
    for x_i, y_i in zip(x, y):
        with tf.GradientTape() as tape:
            loss = influence_model.loss_function(y_i[None], influence_model.model(x_i[None]))
        rows.append(np.concatenate([tf.convert_to_tensor(g).numpy().ravel()
                                    for g in tape.gradient(loss, influence_model.weights)]))
    return np.stack(rows)


def _block_indices(influence_model, block):
    """Flat positions of a block's (rows, out) matrix entries (row-major, the bias as last row)."""
    offsets = np.cumsum([0] + influence_model.kernels.sizes)
    kernel = np.arange(offsets[block.kernel_position], offsets[block.kernel_position + 1])[block.to_matrix]
    if block.bias_position is None:
        return kernel
    return np.concatenate([kernel, np.arange(offsets[block.bias_position], offsets[block.bias_position + 1])])


def _dense_inverse(influence_model, blocks, curvatures, regularization, invert=True):
    """The block-diagonal (P, P) matrix of the inverses of the given damped (rows·out)² block curvatures (or of the
    undamped curvatures themselves when ``invert`` is False)."""
    size = influence_model.nb_params
    matrix = np.zeros((size, size))
    for block, curvature in zip(blocks, curvatures):
        indices = _block_indices(influence_model, block)
        damped = curvature + regularization * np.eye(len(curvature))
        matrix[np.ix_(indices, indices)] = np.linalg.inv(damped) if invert else curvature
    return matrix


def test_mlp_factors_match_closed_forms_and_products_match_the_dense_block_diagonal():
    influence_model, dataset, x, y, model = _mlp()
    solver = EKFACIHVP(influence_model, dataset, regularization=1e-2)
    kfac = KFACIHVP(influence_model, dataset, regularization=1e-2)
    gradients = _per_sample_gradients(influence_model, x, y)
    assert [block.name for block in solver.blocks] == [layer.name for layer in model.layers]
    kfac_blocks, ekfac_blocks = [], []
    for index, (block, (rows, deltas)) in enumerate(zip(solver.blocks, _mlp_factors(model, x, y))):
        fields = solver.state[str(index)]
        activations, outputs = rows.T @ rows / len(x), deltas.T @ deltas / len(x)
        np.testing.assert_allclose(fields["activation_sum"] / fields["rows_count"], activations, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fields["gradient_sum"] / fields["samples"], outputs, rtol=1e-9, atol=1e-12)
        rows_basis, outputs_basis = fields["rows_basis"], fields["outputs_basis"]
        np.testing.assert_allclose(rows_basis.T @ activations @ rows_basis, np.diag(fields["rows_values"]), atol=1e-10)
        np.testing.assert_allclose(outputs_basis.T @ outputs @ outputs_basis, np.diag(fields["outputs_values"]),
                                   atol=1e-10)
        matrices = gradients[:, _block_indices(influence_model, block)].reshape(len(x), block.rows, block.out_size)
        np.testing.assert_allclose(matrices, np.einsum("ni,no->nio", rows, deltas), rtol=1e-8, atol=1e-12)
        corrected = np.mean(np.einsum("ji,njo,ok->nik", rows_basis, matrices, outputs_basis) ** 2, axis=0)
        np.testing.assert_allclose(fields["corrected"], corrected, rtol=1e-9, atol=1e-14)
        basis = np.kron(rows_basis, outputs_basis)
        kfac_blocks.append(np.kron(activations, outputs))
        ekfac_blocks.append(basis @ np.diag(corrected.ravel()) @ basis.T)
    vectors = np.random.default_rng(5).normal(size=(influence_model.nb_params, 3))
    for fitted, blocks in ((kfac, kfac_blocks), (solver, ekfac_blocks)):
        inverse = _dense_inverse(influence_model, fitted.blocks, blocks, 1e-2)
        np.testing.assert_allclose(fitted.apply_inverse(tf.constant(vectors)).numpy(), inverse @ vectors, rtol=1e-8)
        np.testing.assert_allclose(fitted.quadratic_form(tf.constant(vectors)).numpy(),
                                   np.sum(vectors * (inverse @ vectors), axis=0), rtol=1e-8)
        forward = _dense_inverse(influence_model, fitted.blocks, blocks, 0.0, invert=False)
        np.testing.assert_allclose(fitted.apply_hessian(tf.constant(vectors)).numpy(), forward @ vectors, rtol=1e-8,
                                   atol=1e-14)


def test_kfac_equals_the_exact_fisher_when_inputs_and_output_gradients_are_independent():
    """A linear layer at W = 0 under the squared error: δ = -2y/out, so with every (x, y) pair of two sets the rows
    and the output gradients are independent and E[(a aᵀ) ⊗ (δ δᵀ)] = A ⊗ S exactly."""
    rng = np.random.default_rng(3)
    inputs, targets = rng.normal(size=(6, 3)), rng.normal(size=(5, 2))
    x = np.repeat(inputs, len(targets), axis=0)
    y = np.tile(targets, (len(inputs), 1))
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(2, kernel_initializer="zeros",
                                                                               dtype=F64)])
    loss = keras.losses.MeanSquaredError(reduction="none", dtype=F64)
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    gradients = _per_sample_gradients(influence_model, x, y)
    fisher = gradients.T @ gradients / len(x)
    vectors = rng.normal(size=(influence_model.nb_params, 2))
    for solver_class in (KFACIHVP, EKFACIHVP):
        solver = solver_class(influence_model, dataset, regularization=1e-3)
        order = _block_indices(influence_model, solver.blocks[0])
        expected = np.zeros_like(fisher)
        expected[np.ix_(order, order)] = np.linalg.inv(fisher[np.ix_(order, order)] + 1e-3 * np.eye(len(order)))
        np.testing.assert_allclose(solver.apply_inverse(tf.constant(vectors)).numpy(), expected @ vectors, rtol=1e-8)


def _im2col(images, size, stride, padding):
    """Explicit patches (N, T, size·size·C) of a channels-last convolution, row-major (height, width, channels)."""
    if padding == "same":
        total = max(size - stride, 0) if images.shape[1] % stride == 0 else max(size - images.shape[1] % stride, 0)
        before = total // 2
        images = np.pad(images, ((0, 0), (before, total - before), (before, total - before), (0, 0)))
    height = (images.shape[1] - size) // stride + 1
    patches = [images[:, r * stride:r * stride + size, c * stride:c * stride + size, :].reshape(len(images), -1)
               for r in range(height) for c in range(height)]
    return np.stack(patches, axis=1)


@pytest.mark.parametrize("position_scaling, shifted_moments", [("sum", False), ("mean", False), ("sum", True)])
def test_conv2d_factors_match_an_explicit_im2col(position_scaling, shifted_moments, monkeypatch):
    if shifted_moments:  # the first layer's A from shifted input windows (conv_moments), not from its patches
        monkeypatch.setattr(layer_adapters, "SHIFTED_MOMENTS_MIN_POSITIONS", 1)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(11, 6, 6, 2))
    labels = rng.integers(0, 3, size=11)
    inputs = keras.Input((6, 6, 2), dtype=F64)
    first = keras.layers.Conv2D(3, 3, padding="same", dtype=F64, name="first")
    second = keras.layers.Conv2D(4, 3, strides=2, dtype=F64, name="second")
    z1 = first(inputs)
    z2 = second(keras.layers.Activation("tanh", dtype=F64)(z1))
    logits = keras.layers.Dense(3, dtype=F64)(keras.layers.GlobalAveragePooling2D(dtype=F64)(z2))
    model = keras.Model(inputs, logits)
    probe = keras.Model(inputs, [z1, z2, logits])
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    solver = KFACIHVP(influence_model, dataset, regularization=1e-3, position_scaling=position_scaling)
    with tf.GradientTape() as tape:
        first_out, second_out, outputs = probe(images)
        loss = tf.reduce_sum(_cross_entropy()(labels, outputs))
    deltas = [gradient.numpy() for gradient in tape.gradient(loss, [first_out, second_out])]
    layer_inputs = [images, np.tanh(first_out.numpy())]
    for index, (layer, layer_input, delta) in enumerate(zip((first, second), layer_inputs, deltas)):
        rows = _im2col(layer_input, 3, layer.strides[0], layer.padding)
        rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2).reshape(-1, rows.shape[2] + 1)
        flat_deltas = delta.reshape(-1, delta.shape[-1])
        positions = delta.shape[1] * delta.shape[2]
        fields = solver.state[str(index)]
        assert solver.blocks[index].name == layer.name and float(fields["rows_count"]) == 11 * positions
        np.testing.assert_allclose(fields["activation_sum"], rows.T @ rows, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(fields["gradient_sum"], flat_deltas.T @ flat_deltas, rtol=1e-9, atol=1e-12)
        outputs_factor = flat_deltas.T @ flat_deltas / 11 / (positions if position_scaling == "mean" else 1)
        values = np.sort(np.linalg.eigvalsh(outputs_factor))
        np.testing.assert_allclose(np.sort(fields["outputs_values"]), values, rtol=1e-8, atol=1e-14)
    # Self-influence from the factors (the first block forms G_i before rotating it, the second rotates the rows)
    # equals the quadratic form of the flat per-sample gradients; float32 products agree to float32 precision.
    ekfac = EKFACIHVP(influence_model, dataset, regularization=1e-3, position_scaling=position_scaling)
    batch = (tf.constant(images), tf.constant(labels))
    flat = tf.transpose(influence_model.batch_jacobian_tensor(batch))
    expected = ekfac.quadratic_form(flat).numpy()
    np.testing.assert_allclose(ekfac.batch_quadratic_form(batch).numpy(), expected, rtol=1e-9)
    single = EKFACIHVP(influence_model, dataset, regularization=1e-3, position_scaling=position_scaling,
                       solve_dtype="float32")
    np.testing.assert_allclose(single.batch_quadratic_form(batch).numpy(), expected, rtol=1e-4)
    gradients = _per_sample_gradients(influence_model, images, labels)
    for index, block in enumerate(ekfac.blocks):
        fields = ekfac.state[str(index)]
        matrices = gradients[:, _block_indices(influence_model, block)].reshape(11, block.rows, block.out_size)
        rotated = np.einsum("ji,njo,ok->nik", fields["rows_basis"], matrices, fields["outputs_basis"])
        np.testing.assert_allclose(fields["corrected"], np.mean(rotated ** 2, axis=0), rtol=1e-8, atol=1e-15)


def _attention_classifier(seed: int = 0):
    """Embedding -> multi-head attention (EinsumDense projections) -> LayerNormalization -> Dense."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(9, 6, dtype=F64)(tokens)
    attended = keras.layers.MultiHeadAttention(2, 3, dtype=F64)(embedded, embedded)
    normalised = keras.layers.LayerNormalization(dtype=F64)(embedded + attended)
    logits = keras.layers.Dense(3, dtype=F64)(keras.layers.GlobalAveragePooling1D(dtype=F64)(normalised))
    model = keras.Model(tokens, logits)
    rng = np.random.default_rng(seed)
    return model, rng.integers(0, 9, size=(19, 5)).astype(np.int32), rng.integers(0, 3, size=19)


def test_attention_and_embedding_blocks_against_per_sample_gradients():
    model, tokens, labels = _attention_classifier()
    watched = [weight for weight in model.trainable_variables if "layer_normalization" not in weight.path]
    influence_model = BaseInfluenceModel(model, watched, loss_function=_cross_entropy())
    dataset = tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(6)
    solver = EKFACIHVP(influence_model, dataset, regularization=1e-3)
    assert sorted(block.layer_type for block in solver.blocks) == ["Dense"] + ["EinsumDense"] * 4 + ["Embedding"]
    gradients = _per_sample_gradients(influence_model, tokens, labels)
    curvatures = []
    for index, block in enumerate(solver.blocks):
        fields = solver.state[str(index)]
        matrices = gradients[:, _block_indices(influence_model, block)].reshape(len(tokens), block.rows,
                                                                                block.out_size)
        rows_basis = fields.get("rows_basis", np.eye(block.rows))
        if block.diagonal_rows:  # the embedding's A: token frequencies
            counts = np.bincount(tokens.ravel(), minlength=9) / tokens.size
            np.testing.assert_allclose(fields["rows_values"], counts, rtol=1e-12)
        corrected = np.mean(np.einsum("ji,njo,ok->nik", rows_basis, matrices, fields["outputs_basis"]) ** 2, 0)
        np.testing.assert_allclose(fields["corrected"], corrected, rtol=1e-8, atol=1e-15)
        basis = np.kron(rows_basis, fields["outputs_basis"])
        curvatures.append(basis @ np.diag(corrected.ravel()) @ basis.T)
    vectors = np.random.default_rng(6).normal(size=(influence_model.nb_params, 2))
    inverse = _dense_inverse(influence_model, solver.blocks, curvatures, 1e-3)
    np.testing.assert_allclose(solver.apply_inverse(tf.constant(vectors)).numpy(), inverse @ vectors, rtol=1e-7)


def test_unsupported_layers_raise_or_are_left_out():
    model, tokens, labels = _attention_classifier()
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy())
    dataset = tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(6)
    with pytest.raises(ValueError, match="layer_normalization.*unsupported_layers='skip'"):
        KFACIHVP(influence_model, dataset, regularization=1e-3)
    solver = KFACIHVP(influence_model, dataset, regularization=1e-3, unsupported_layers="skip")
    skipped = [influence_model.weights[position].path for position in solver.structure.skipped]
    assert sorted(skipped) == sorted(w.path for w in model.trainable_variables if "layer_normalization" in w.path)
    vectors = np.ones((influence_model.nb_params, 1))
    result = solver.apply_inverse(tf.constant(vectors)).numpy()[:, 0]
    offsets = np.cumsum([0] + influence_model.kernels.sizes)
    for position in solver.structure.skipped:
        assert np.all(result[offsets[position]:offsets[position + 1]] == 0)
    assert np.all(np.isfinite(result)) and np.abs(result).sum() > 0


def test_calculator_scores_with_ekfac_equal_the_dense_formula():
    """Pairwise, self-influence, RelatIF and groups through FirstOrderInfluenceCalculator."""
    influence_model, dataset, x, y, _ = _mlp(seed=1, samples=20)
    solver = EKFACIHVP(influence_model, dataset, regularization=1e-2)
    gradients = _per_sample_gradients(influence_model, x, y)
    inverse = solver.apply_inverse(tf.constant(np.eye(influence_model.nb_params))).numpy()
    calculator = FirstOrderInfluenceCalculator(influence_model, dataset, ihvp_calculator=solver)
    test = tf.data.Dataset.from_tensor_slices((x[:5], y[:5])).batch(3)
    np.testing.assert_allclose(calculator.influence_matrix(test, dataset).numpy(),
                               gradients[:5] @ inverse @ gradients.T, rtol=1e-7)
    self_influence = np.concatenate([v.numpy().ravel() for _, v in calculator.compute_influence_values(dataset)])
    np.testing.assert_allclose(self_influence, np.einsum("np,pq,nq->n", gradients, inverse, gradients), rtol=1e-7)
    group = tf.data.Dataset.from_tensor_slices((x[5:10], y[5:10])).batch(2)
    np.testing.assert_allclose(calculator.estimate_influence_values_group(group, test).numpy()[0, 0],
                               gradients[:5].sum(0) @ inverse @ gradients[5:10].sum(0), rtol=1e-7)
    relatif = FirstOrderInfluenceCalculator(influence_model, dataset, ihvp_calculator=solver, normalize=True)
    vectors = np.concatenate([v.numpy() for _, v in relatif.compute_influence_vector(test)])
    expected = (inverse @ gradients[:5].T).T
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-7)


def test_true_fisher_is_seeded_and_its_output_factor_is_the_expected_gauss_newton_one():
    """With labels drawn from the model, the output layer's S tends to mean_i (diag p_i - p_i p_iᵀ) (2,000 draws:
    the data repeated); the same seed gives the same factors, another seed other ones."""
    influence_model, _, x, _, model = _mlp(seed=2, samples=10)
    repeated = np.tile(x, (200, 1))
    dataset = tf.data.Dataset.from_tensor_slices((repeated, np.zeros(len(repeated), np.int64))).batch(250)
    first = KFACIHVP(influence_model, dataset, regularization=1e-3, fisher="true", seed=1)
    again = KFACIHVP(influence_model, dataset, regularization=1e-3, fisher="true", seed=1)
    other = KFACIHVP(influence_model, dataset, regularization=1e-3, fisher="true", seed=2)
    sums = [solver.state["1"]["gradient_sum"] for solver in (first, again, other)]
    np.testing.assert_array_equal(sums[0], sums[1])
    assert not np.allclose(sums[0], sums[2])
    probabilities = tf.nn.softmax(model(x)).numpy()
    expected = np.mean([np.diag(p) - np.outer(p, p) for p in probabilities], axis=0)
    np.testing.assert_allclose(sums[0] / len(repeated), expected, atol=0.02)


def test_with_regularization_and_damping_heuristic():
    influence_model, dataset, _, _, _ = _mlp()
    solver = EKFACIHVP(influence_model, dataset, regularization=1e-2)
    fresh = EKFACIHVP(influence_model, dataset, regularization=1e-4)
    vectors = tf.constant(np.random.default_rng(8).normal(size=(influence_model.nb_params, 2)))
    np.testing.assert_allclose(solver.with_regularization(1e-4).apply_inverse(vectors).numpy(),
                               fresh.apply_inverse(vectors).numpy(), rtol=1e-10)
    heuristic = EKFACIHVP(influence_model, dataset, regularization=0.0, damping_heuristic=0.1)
    for index in range(len(heuristic.blocks)):
        assert heuristic.block_damping(index) == pytest.approx(0.1 * heuristic.state[str(index)]["corrected"].mean())
    block = heuristic.blocks[1]
    fields = heuristic.state["1"]
    basis = np.kron(fields["rows_basis"], fields["outputs_basis"])
    curvature = basis @ np.diag(fields["corrected"].ravel()) @ basis.T
    indices = _block_indices(influence_model, block)
    expected = np.linalg.solve(curvature + heuristic.block_damping(1) * np.eye(len(indices)),
                               vectors.numpy()[indices])
    np.testing.assert_allclose(heuristic.apply_inverse(vectors).numpy()[indices], expected, rtol=1e-8)


def test_solver_registry_names_and_configuration():
    influence_model, dataset, _, _, _ = _mlp()
    by_name = build_solver("ekfac", influence_model, dataset, regularization=1e-3)
    by_config = build_solver(KFACConfig(regularization=1e-3, fisher="empirical"), influence_model, dataset)
    assert isinstance(by_name, EKFACIHVP) and type(by_config) is KFACIHVP  # pylint: disable=unidiomatic-typecheck
    assert by_name.regularization == by_config.regularization == 1e-3


def test_save_load_and_resume_from_cache(tmp_path, monkeypatch):
    influence_model, dataset, _, _, model = _mlp()
    solver = EKFACIHVP(influence_model, dataset, regularization=1e-3)
    vectors = tf.constant(np.random.default_rng(9).normal(size=(influence_model.nb_params, 2)))
    solver.save(tmp_path / "factors")
    loaded = EKFACIHVP.load(tmp_path / "factors", influence_model, dataset, regularization=1e-3)
    np.testing.assert_allclose(loaded.apply_inverse(vectors).numpy(), solver.apply_inverse(vectors).numpy(),
                               rtol=1e-12)
    # A cache directory: the second fit reads every stage and makes no pass over the data.
    cached = EKFACIHVP(influence_model, dataset, regularization=1e-3, cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
        "corrected_eigenvalues.npz", "covariances.npz", "eigendecompositions.npz"]

    def no_pass(*args, **kwargs):
        raise AssertionError("the data was read again")

    monkeypatch.setattr(EKFACIHVP, "_stream", no_pass)
    resumed = EKFACIHVP(influence_model, dataset, regularization=1e-3, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(resumed.apply_inverse(vectors).numpy(), cached.apply_inverse(vectors).numpy(),
                               rtol=1e-12)
    monkeypatch.undo()
    # A killed fit: the corrected eigenvalues stage is missing, only it is recomputed.
    (tmp_path / "cache" / "corrected_eigenvalues.npz").unlink()
    calls = []
    original = EKFACIHVP._stream  # pylint: disable=protected-access
    monkeypatch.setattr(EKFACIHVP, "_stream", lambda self, name, *args: calls.append(name) or original(self, name,
                                                                                                         *args))
    EKFACIHVP(influence_model, dataset, regularization=1e-3, cache_dir=tmp_path / "cache")
    assert calls == ["corrected"]
    # Other weights: loading is refused; the cache is refitted.
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    with pytest.raises(ValueError, match="other weights"):
        EKFACIHVP.load(tmp_path / "factors", influence_model, dataset, regularization=1e-3)
    with pytest.raises(ValueError, match="holds 'ekfac' factors, not 'kfac'|no manifest"):
        KFACIHVP.load(tmp_path / "cache", influence_model, dataset)


def test_input_errors():
    influence_model, dataset, _, _, _ = _mlp()
    with pytest.raises(ValueError, match="fisher must be one of"):
        KFACIHVP(influence_model, dataset, fisher="exact")
    with pytest.raises(ValueError, match="unsupported_layers must be one of"):
        KFACIHVP(influence_model, dataset, unsupported_layers="ignore")
    with pytest.raises(ValueError, match="solve_dtype"):
        KFACIHVP(influence_model, dataset, solve_dtype="float16")
    with pytest.raises(ValueError, match="position_scaling"):
        KFACIHVP(influence_model, dataset, position_scaling="max")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        EKFACIHVP(influence_model, dataset, memory_budget_bytes=100)
    with pytest.raises(ValueError, match="needs a train_dataset"):
        KFACIHVP(influence_model, None)
    loss = keras.losses.MeanSquaredError(reduction="none", dtype=F64)
    regression = BaseInfluenceModel(influence_model.model, influence_model.weights, loss_function=loss)
    with pytest.raises(ValueError, match="from_logits"):
        KFACIHVP(regression, dataset, fisher="true")
    with pytest.raises(ValueError, match="regularization"):
        KFACIHVP(influence_model, dataset, regularization=-1.0)


def test_compressed_queries_equal_the_truncated_svd_of_the_preconditioned_gradients():
    """rank=None: the exact scores; rank r: the scores of each block's rank-r SVD truncation, from the training
    batches' factors (dense layers and an embedding with attention)."""
    for build in ("mlp", "attention"):
        if build == "mlp":
            influence_model, dataset, x, y, _ = _mlp(seed=3, samples=21)
        else:
            model, x, y = _attention_classifier(seed=1)
            watched = [w for w in model.trainable_variables if "layer_normalization" not in w.path]
            influence_model = BaseInfluenceModel(model, watched, loss_function=_cross_entropy())
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
        solver = EKFACIHVP(influence_model, dataset, regularization=1e-3)
        test = tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(3)
        gradients = _per_sample_gradients(influence_model, x, y)
        preconditioned = solver.apply_inverse(tf.constant(gradients[:4].T)).numpy().T
        np.testing.assert_allclose(CompressedQueries(solver, test).scores(dataset).numpy(),
                                   preconditioned @ gradients.T, rtol=1e-8)
        expected = np.zeros((4, len(x)))
        for block in solver.blocks:
            indices = _block_indices(influence_model, block)
            matrices = preconditioned[:, indices].reshape(4, block.rows, block.out_size)
            left, values, right = np.linalg.svd(matrices, full_matrices=False)
            truncated = np.einsum("tir,tr,tro->tio", left[:, :, :2], values[:, :2], right[:, :2])
            expected += truncated.reshape(4, -1) @ gradients[:, indices].T
        queries = CompressedQueries(solver, test, rank=2)
        np.testing.assert_allclose(queries.scores(dataset).numpy(), expected, rtol=1e-7, atol=1e-9)
        assert queries.stored_floats == 4 * sum(2 * (block.rows + block.out_size) if min(block.rows, block.out_size) > 2
                                                else block.rows * block.out_size for block in solver.blocks)
    with pytest.raises(ValueError, match="rank"):
        CompressedQueries(solver, test, rank=0)
    with pytest.raises(TypeError, match="KFACIHVP"):
        CompressedQueries(object(), test)


def test_solvers_of_one_model_share_their_traced_passes():
    """A second solver on the same model (another λ, another scaling) reuses the traced passes: no new trace; a
    different Fisher seed for the true Fisher, or another model, traces its own."""
    influence_model, dataset, _, _, _ = _mlp(samples=21)  # batches of 8, 8 and 5: one trace covers all
    first = EKFACIHVP(influence_model, dataset, regularization=1e-3)
    second = EKFACIHVP(influence_model, dataset, regularization=1e-1, position_scaling="mean")
    for name in ("covariances", "corrected"):
        assert second._compiled[name] is first._compiled[name]  # pylint: disable=protected-access
        assert first._compiled[name].experimental_get_tracing_count() == 1  # pylint: disable=protected-access
    seeded = [EKFACIHVP(influence_model, dataset, fisher="true", seed=seed) for seed in (0, 1)]
    assert seeded[0]._compiled["corrected"] is not seeded[1]._compiled["corrected"]  # pylint: disable=W0212
    other_model = _mlp(samples=21)[0]
    assert EKFACIHVP(other_model, dataset)._compiled["covariances"] is not first._compiled["covariances"]
