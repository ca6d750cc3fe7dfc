"""Tests of ``deel.influenciae.utils.nearest_neighbors.LinearNearestNeighbors`` against brute force."""
# pylint: disable=missing-function-docstring
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import ORDER, LinearNearestNeighbors


def dot_product(queries, vectors):
    return tf.matmul(queries, vectors, transpose_b=True)


def brute_force(queries, vectors, keys, k, order):
    """Expected (values, keys, positions) of the k best indexed samples per query, ties to the lower index."""
    similarities = queries.astype(np.float64) @ vectors.astype(np.float64).T
    sort_key = -similarities if order == ORDER.DESCENDING else similarities
    positions = np.argsort(sort_key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, positions, axis=1), keys[positions], positions


def indexed_dataset(keys, vectors, batch_size, drop_remainder=False):
    labels = np.arange(len(keys), dtype=np.float32)
    return tf.data.Dataset.from_tensor_slices(((keys, labels), vectors)).batch(batch_size,
                                                                               drop_remainder=drop_remainder)


def worked_example_dataset():
    vectors = np.array([[i, i] for i in range(1, 7)], dtype=np.float32)
    return indexed_dataset(10.0 * vectors, vectors, batch_size=2, drop_remainder=True)


WORKED_QUERIES = np.array([[1.0, 1.0], [-0.5, 1.0], [0.0, -1.0]], dtype=np.float32)


def test_worked_example_descending():
    """SPEC 3.3: similarities are 2i, 0.5i and -i for the three queries (i = 1..6)."""
    neighbors = LinearNearestNeighbors()
    neighbors.build(worked_example_dataset(), dot_product, k=4, query_batch_size=3, d_type=tf.float32,
                    order=ORDER.DESCENDING)
    values, samples = neighbors.query(tf.constant(WORKED_QUERIES))
    expected_values = np.array([[12.0, 10.0, 8.0, 6.0], [3.0, 2.5, 2.0, 1.5], [-1.0, -2.0, -3.0, -4.0]])
    expected_samples = np.array([[[60, 60], [50, 50], [40, 40], [30, 30]],
                                 [[60, 60], [50, 50], [40, 40], [30, 30]],
                                 [[10, 10], [20, 20], [30, 30], [40, 40]]], dtype=np.float32)
    assert values.shape == (3, 4) and samples.shape == (3, 4, 2)
    assert np.max(np.abs(values.numpy() - expected_values)) < 1e-6
    assert np.max(np.abs(samples.numpy() - expected_samples)) < 1e-6
    _, _, positions = neighbors.query_with_indices(tf.constant(WORKED_QUERIES))
    np.testing.assert_array_equal(positions.numpy(), [[5, 4, 3, 2], [5, 4, 3, 2], [0, 1, 2, 3]])


def test_worked_example_ascending():
    neighbors = LinearNearestNeighbors()
    neighbors.build(worked_example_dataset(), dot_product, k=4, query_batch_size=3, order=ORDER.ASCENDING)
    values, samples = neighbors.query(tf.constant(WORKED_QUERIES))
    expected_values = np.array([[2.0, 4.0, 6.0, 8.0], [0.5, 1.0, 1.5, 2.0], [-6.0, -5.0, -4.0, -3.0]])
    expected_samples = np.array([[[10, 10], [20, 20], [30, 30], [40, 40]],
                                 [[10, 10], [20, 20], [30, 30], [40, 40]],
                                 [[60, 60], [50, 50], [40, 40], [30, 30]]], dtype=np.float32)
    assert np.max(np.abs(values.numpy() - expected_values)) < 1e-6
    assert np.max(np.abs(samples.numpy() - expected_samples)) < 1e-6


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_random_data_matches_brute_force(order):
    rng = np.random.default_rng(3)
    num_indexed, dim, k = 23, 4, 6
    keys = rng.normal(size=(num_indexed, 3, 2)).astype(np.float32)
    vectors = rng.normal(size=(num_indexed, dim)).astype(np.float32)
    dataset = indexed_dataset(keys, vectors, batch_size=5)  # batches of 5, 5, 5, 5, 3
    neighbors = LinearNearestNeighbors()
    neighbors.build(dataset, dot_product, k=k, query_batch_size=4, order=order)
    # Query batches of a size other than query_batch_size.
    for num_queries in (7, 2):
        queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
        values, samples, positions = neighbors.query_with_indices(tf.constant(queries))
        expected_values, expected_samples, expected_positions = brute_force(queries, vectors, keys, k, order)
        np.testing.assert_array_equal(positions.numpy(), expected_positions)
        np.testing.assert_allclose(values.numpy(), expected_values, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(samples.numpy(), expected_samples)
        assert samples.shape == (num_queries, k, 3, 2)
        plain_values, plain_samples = neighbors.query(tf.constant(queries))
        np.testing.assert_array_equal(plain_values.numpy(), values.numpy())
        np.testing.assert_array_equal(plain_samples.numpy(), samples.numpy())


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_ties_keep_the_earlier_indexed_sample(order):
    rng = np.random.default_rng(4)
    num_indexed, dim, k = 19, 3, 5
    # Small integers: exact float32 dot products and many ties, also across batch boundaries.
    vectors = rng.integers(-1, 2, size=(num_indexed, dim)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(6, dim)).astype(np.float32)
    keys = np.arange(num_indexed, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    neighbors = LinearNearestNeighbors()
    neighbors.build(indexed_dataset(keys, vectors, batch_size=4), dot_product, k=k, order=order)
    values, samples, positions = neighbors.query_with_indices(tf.constant(queries))
    expected_values, expected_samples, expected_positions = brute_force(queries, vectors, keys, k, order)
    np.testing.assert_array_equal(positions.numpy(), expected_positions)
    np.testing.assert_array_equal(values.numpy(), expected_values)
    np.testing.assert_array_equal(samples.numpy(), expected_samples)


def test_fewer_indexed_samples_than_k():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    neighbors = LinearNearestNeighbors()
    neighbors.build(indexed_dataset(vectors + 1.0, vectors, batch_size=2), dot_product, k=5)
    values, samples = neighbors.query(tf.constant([[2.0, 1.0]]))
    np.testing.assert_array_equal(values.numpy()[:, :3], [[3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(values.numpy()[:, 3:], [[-np.inf, -np.inf]])
    np.testing.assert_array_equal(samples.numpy(), [[[2.0, 2.0], [2.0, 1.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])


def test_float64_values_and_structured_vectors():
    """Vectors may be any structure understood by the similarity; values come in d_type."""
    rng = np.random.default_rng(5)
    first = rng.normal(size=(9, 3)).astype(np.float32)
    second = rng.normal(size=(9, 3)).astype(np.float32)
    keys = rng.normal(size=(9, 2)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(((keys,), (first, second))).batch(4)

    def similarity(queries, vectors):
        return dot_product(queries, vectors[0]) + 2.0 * dot_product(queries, vectors[1])

    neighbors = LinearNearestNeighbors()
    neighbors.build(dataset, similarity, k=3, d_type=tf.float64)
    queries = rng.normal(size=(2, 3)).astype(np.float32)
    values, samples = neighbors.query(tf.constant(queries))
    expected_values, expected_samples, _ = brute_force(queries, first + 2.0 * second, keys, 3, ORDER.DESCENDING)
    assert values.dtype == tf.float64
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(samples.numpy(), expected_samples)


def test_structured_queries():
    """Queries may be a structure too (RPS passes (features, labels)); Q is read from its first tensor."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(8, 3)).astype(np.float32)
    keys = np.arange(8, dtype=np.float32)
    queries = rng.normal(size=(3, 3)).astype(np.float32)
    weights = np.array([1.0, -1.0, 2.0], dtype=np.float32)

    def similarity(query_structure, indexed):
        features, query_weights = query_structure
        return query_weights[:, None] * dot_product(features, indexed)

    neighbors = LinearNearestNeighbors()
    neighbors.build(indexed_dataset(keys, vectors, batch_size=3), similarity, k=2)
    values, samples = neighbors.query((tf.constant(queries), tf.constant(weights)))
    expected_values, expected_samples, _ = brute_force(queries * weights[:, None], vectors, keys, 2, ORDER.DESCENDING)
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(samples.numpy(), expected_samples)


def test_query_inside_dataset_map_and_tf_function():
    rng = np.random.default_rng(6)
    num_indexed, dim, k = 17, 5, 4
    keys = rng.normal(size=(num_indexed, 2)).astype(np.float32)
    vectors = rng.normal(size=(num_indexed, dim)).astype(np.float32)
    neighbors = LinearNearestNeighbors()
    neighbors.build(indexed_dataset(keys, vectors, batch_size=6), dot_product, k=k, query_batch_size=4)
    queries = rng.normal(size=(10, dim)).astype(np.float32)
    query_ds = tf.data.Dataset.from_tensor_slices(queries).batch(4)  # 4, 4, 2
    results = list(query_ds.map(neighbors.query))
    assert len(results) == 3
    got_values = np.concatenate([values.numpy() for values, _ in results])
    got_samples = np.concatenate([samples.numpy() for _, samples in results])
    expected_values, expected_samples, _ = brute_force(queries, vectors, keys, k, ORDER.DESCENDING)
    np.testing.assert_allclose(got_values, expected_values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got_samples, expected_samples)

    compiled = tf.function(neighbors.query)
    values, samples = compiled(tf.constant(queries[:3]))
    np.testing.assert_allclose(values.numpy(), expected_values[:3], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(samples.numpy(), expected_samples[:3])


@pytest.mark.parametrize("k", [0, -1])
def test_build_rejects_k_below_one(k):
    with pytest.raises(ValueError):
        LinearNearestNeighbors().build(worked_example_dataset(), dot_product, k=k)


def test_build_rejects_non_order():
    with pytest.raises(TypeError):
        LinearNearestNeighbors().build(worked_example_dataset(), dot_product, k=2, order="ASCENDING")


def test_query_before_build():
    with pytest.raises(ValueError):
        LinearNearestNeighbors().query(tf.constant(WORKED_QUERIES))
