"""GradientProjector against explicit matrices: dense blocks, Kronecker-factored layers, unbiasedness over seeds."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, GradientProjector
from deel.influenciae.common import gradient_projector
from deel.influenciae.common.gradient_projector import (BLOCK_ROWS, dense_projection, random_block, split_dimensions,
                                                        srht_plan)
from tests.per_sample import tape_gradients

F64 = "float64"


def _cross_entropy(dtype=F64):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype=dtype)


def _influence_model(model, dtype=F64):
    return BaseInfluenceModel(model, model.trainable_variables, loss_function=_cross_entropy(dtype))


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,), dtype=F64), keras.layers.Dense(7, activation="tanh", dtype=F64),
                             keras.layers.Dense(3, dtype=F64)])


def _cnn(seed=0):
    """Conv2D stride 1 on 16 x 16 (input windows), a strided Conv2D, Dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((16, 16, 2), dtype=F64),
                             keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype=F64),
                             keras.layers.Conv2D(4, 3, strides=2, activation="tanh", dtype=F64),
                             keras.layers.Flatten(dtype=F64), keras.layers.Dense(3, dtype=F64)])


def _embedding_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(11, 4, dtype=F64),
                             keras.layers.Flatten(dtype=F64), keras.layers.Dense(3, dtype=F64)])


def _attention_model(seed=0):
    """Embedding, self-attention (EinsumDense projections), LayerNormalization, Dense."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(11, 4, dtype=F64)(tokens)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, dtype=F64)(hidden, hidden)
    hidden = keras.layers.LayerNormalization(dtype=F64)(hidden + attended)
    return keras.Model(tokens, keras.layers.Dense(3, dtype=F64)(keras.layers.Flatten(dtype=F64)(hidden)))


def _classification_batch(shape, samples=9, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(samples, *shape)), rng.integers(0, 3, size=samples)


def _full_matrix(projector, influence_model, batch):
    """The P x d matrix of a factored projection in the model's flat layout: Kronecker blocks for the factored
    kernels, the rest's dense rows for the other weights (closed forms in layer order, then materialised)."""
    bound = projector.bind(influence_model)
    pairs = bound.layer_matrices(batch)
    factors = influence_model.layer_factors(batch)
    offsets = dict(zip([id(w) for w in influence_model.weights],
                       np.cumsum([0] + influence_model.kernels.sizes)[:-1]))
    size = influence_model.nb_params
    columns, rest_rows, blocks = 0, [], []
    for layer, pair in zip(factors.layers, pairs):
        if pair is not None:
            r_in, r_out = (matrix.numpy() for matrix in pair)
            kron = np.kron(r_in, r_out) / np.sqrt(r_in.shape[1] * r_out.shape[1])
            # Row q of the kernel's flat gradient is entry order[q] of its (in, out) matrix (EinsumDense permutes).
            positions = tf.reshape(tf.range(layer.in_size * layer.out_size, dtype=tf.float64),
                                   [1, layer.in_size, layer.out_size])
            order = tf.reshape(layer.kernel_layout(positions), [-1]).numpy().astype(int)
            blocks.append((offsets[id(layer.kernel)], columns, kron[order]))
            columns += kron.shape[1]
        rest_rows += [(offsets[id(w)], int(np.prod(w.shape))) for w, _ in layer.closed_forms]
    rest_rows += [(offsets[id(w)], int(np.prod(w.shape))) for w, _ in factors.materialised]
    matrix = np.zeros((size, columns + bound.rest_dim))
    for row, column, kron in blocks:
        matrix[row:row + kron.shape[0], column:column + kron.shape[1]] = kron
    rest_size = sum(count for _, count in rest_rows)
    rest = dense_projection(tf.eye(rest_size, dtype=tf.float64), bound.rest_dim, projector.kind, projector.seed,
                            stream=2).numpy()
    start = 0
    for row, count in rest_rows:
        matrix[row:row + count, columns:] = rest[start:start + count]
        start += count
    return matrix


def test_dense_projection_is_the_product_with_a_seeded_sign_matrix():
    model = _mlp()
    influence_model = _influence_model(model)
    x, y = _classification_batch((6,))
    gradients = tape_gradients(model, _cross_entropy(), x, y)
    projector = GradientProjector(50, seed=4)
    matrix = projector.matrix(influence_model.nb_params).numpy()
    np.testing.assert_allclose(np.sort(np.unique(matrix)), [-1 / np.sqrt(50), 1 / np.sqrt(50)])
    projected = projector.project_batch(influence_model, (x, y)).numpy()
    np.testing.assert_allclose(projected, gradients @ matrix, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(GradientProjector(50, seed=4).project_batch(influence_model, (x, y)), projected)
    assert np.abs(GradientProjector(50, seed=5).project(gradients) - projected).max() > 1e-3
    # Blocks of BLOCK_ROWS rows: a long vector is projected block by block with the same matrix.
    long = np.random.default_rng(0).normal(size=(2, BLOCK_ROWS + 37))
    np.testing.assert_allclose(projector.project(long), long @ projector.matrix(BLOCK_ROWS + 37).numpy(), rtol=1e-10)
    gaussian = GradientProjector(2000, seed=1, kind="gaussian").matrix(30).numpy() * np.sqrt(2000)
    assert abs(gaussian.mean()) < 0.02 and abs(gaussian.std() - 1) < 0.02 and len(np.unique(gaussian)) > 1000


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "srht"])
def test_projected_inner_products_are_unbiased(kind):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(2, 300))
    exact = float(vectors[0] @ vectors[1])
    estimates = []
    for seed in range(300):
        projected = GradientProjector(16, seed=seed, kind=kind).project(vectors).numpy()
        estimates.append(projected[0] @ projected[1])
    estimates = np.array(estimates)
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 3 * standard_error
    assert standard_error > 0


def test_factored_inner_products_are_unbiased():
    model = _mlp()
    influence_model = _influence_model(model)
    x, y = _classification_batch((6,), samples=2)
    gradients = tape_gradients(model, _cross_entropy(), x, y)
    exact = float(gradients[0] @ gradients[1])
    estimates = []
    for seed in range(300):
        projected = GradientProjector(12, seed=seed, factored=True).project_batch(influence_model, (x, y)).numpy()
        estimates.append(projected[0] @ projected[1])
    standard_error = np.std(estimates, ddof=1) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 3 * standard_error


@pytest.mark.parametrize("builder,shape", [(_mlp, (6,)), (_cnn, (16, 16, 2)), (_embedding_model, None),
                                           (_attention_model, None)])
def test_factored_projection_equals_the_kronecker_matrix_on_materialised_gradients(builder, shape):
    model = builder()
    influence_model = _influence_model(model)
    if shape is None:
        rng = np.random.default_rng(2)
        x, y = rng.integers(0, 11, size=(9, 5)).astype(np.int32), rng.integers(0, 3, size=9)
    else:
        x, y = _classification_batch(shape)
    projector = GradientProjector(40, seed=7, factored=True)
    bound = projector.bind(influence_model)
    projected = bound((x, y)).numpy()
    assert projected.shape == (9, bound.output_dim((x, y)))
    assert bound.output_dim((x, y)) <= 40 and bound.rest_dim >= 1
    gradients = tape_gradients(model, _cross_entropy(), x, y)
    matrix = _full_matrix(projector, influence_model, (x, y))
    np.testing.assert_allclose(projected, gradients @ matrix, rtol=1e-5, atol=1e-5 * np.abs(projected).max())
    # Binding again reuses the same compiled projection and matrices.
    assert projector.bind(influence_model) is bound
    np.testing.assert_allclose(GradientProjector(40, seed=7, factored=True).project_batch(influence_model, (x, y)),
                               projected)


def test_windows_of_a_stride_one_convolution_are_used():
    """The 16 x 16 stride-1 convolution's rows come from its input windows (patches never concatenated)."""
    model = _cnn()
    influence_model = _influence_model(model)
    batch = _classification_batch((16, 16, 2))
    factors = influence_model.layer_factors.in_graph(batch)
    assert factors.layers[0].row_windows is not None


def test_split_dimensions_shares_the_output_dimension():
    dims, rest = split_dimensions(1000, [(100, 10), (10, 10)], rest_size=20)
    assert all(1 <= d_in <= rows and 1 <= d_out <= cols for (d_in, d_out), (rows, cols) in
               zip(dims, [(100, 10), (10, 10)]))
    assert sum(a * b for a, b in dims) + rest == 1000
    share = 1000 * 1000 / 1120
    assert share * 0.8 <= dims[0][0] * dims[0][1] <= share
    assert split_dimensions(10, [(4, 4)], rest_size=0)[1] == 0


def test_projector_arguments_are_checked():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="output_dim"):
            GradientProjector(bad)
    with pytest.raises(ValueError, match="seed"):
        GradientProjector(8, seed=-1)
    with pytest.raises(ValueError, match="kind"):
        GradientProjector(8, kind="sparse")
    with pytest.raises(TypeError, match="factored"):
        GradientProjector(8, factored="yes")
    with pytest.raises(ValueError, match="srht.*factored=False"):
        GradientProjector(8, kind="srht", factored=True)
    with pytest.raises(ValueError, match="output_dim=9 .* 8 coordinates"):
        GradientProjector(9, kind="srht").project(np.ones((2, 5)))
    with pytest.raises(ValueError, match="gradients"):
        GradientProjector(8).project(np.ones(5))
    assert GradientProjector(8, seed=2).configuration() == {"output_dim": 8, "seed": 2, "kind": "rademacher",
                                                            "factored": False, "block_rows": BLOCK_ROWS}
    assert "output_dim=8" in repr(GradientProjector(8))


def test_split_dimensions_never_exceeds_the_output_dimension():
    shapes = [(18, 3), (27, 4), (196, 3)]
    for output_dim in (4, 5, 17, 40, 300):
        dims, rest = split_dimensions(output_dim, shapes, rest_size=10)
        assert sum(a * b for a, b in dims) + rest == output_dim and rest >= 1
        assert all(a >= 1 and b >= 1 for a, b in dims)
    with pytest.raises(ValueError, match="output_dim=3 is too small"):
        split_dimensions(3, shapes, rest_size=10)


def _sylvester(order: int) -> np.ndarray:
    matrix = np.ones((1, 1))
    while len(matrix) < order:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


@pytest.mark.parametrize("size,dim,factor_bits", [(37, 16, 7), (300, 50, 7), (300, 50, 3), (64, 64, 2)])
def test_srht_equals_its_definition(monkeypatch, size, dim, factor_bits):
    """√(P'/d) S H D [g, 0] with H the orthonormal Sylvester matrix built here: one Hadamard factor (P' = 64, 512),
    two and three factors (``_HADAMARD_FACTOR_BITS`` lowered), every coordinate kept (d = P')."""
    monkeypatch.setattr(gradient_projector, "_HADAMARD_FACTOR_BITS", factor_bits)
    projector = GradientProjector(dim, seed=5, kind="srht")
    matrix = projector.matrix(size).numpy()
    padded, coordinates = srht_plan(size, dim, 5)
    assert padded == 1 << int(np.ceil(np.log2(size))) and len(set(coordinates.tolist())) == dim
    signs = random_block("rademacher", 5, 0, 0, (1, padded), tf.float64).numpy()[0]
    expected = (signs[:, None] * _sylvester(padded) / np.sqrt(padded))[:size][:, coordinates] * np.sqrt(padded / dim)
    np.testing.assert_allclose(matrix, expected, atol=1e-12)
    np.testing.assert_allclose(np.abs(matrix), 1 / np.sqrt(dim))
    vectors = np.random.default_rng(1).normal(size=(3, size))
    np.testing.assert_allclose(projector.project(vectors).numpy(), vectors @ expected, atol=1e-10)
    assert not np.allclose(GradientProjector(dim, seed=6, kind="srht").matrix(size).numpy(), matrix)
