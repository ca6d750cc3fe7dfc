"""Tests of ``deel.influenciae.utils.sorted_dict``: ORDER, stable_top_k and BatchSort.

Ground truth: a stable numpy sort (``argsort(kind="stable")``) of the whole stream of values, so that
among equal values the entry seen first wins.
"""
# pylint: disable=missing-function-docstring
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import ORDER, BatchSort, stable_top_k


def numpy_stable_ranking(values, order):
    """Indices sorting every row of ``values`` from best to worst, ties kept in stream order."""
    if order == ORDER.DESCENDING:
        return np.argsort(-values, axis=1, kind="stable")
    return np.argsort(values, axis=1, kind="stable")


def numpy_stream_top_k(keys, values, k, order):
    """Expected BatchSort state after seeing the whole stream (keys (Q, N, ...), values (Q, N)).

    Slots beyond the N real entries hold zero keys and -inf (descending) or +inf (ascending) values.
    """
    num_queries, num_entries = values.shape
    fill = -np.inf if order == ORDER.DESCENDING else np.inf
    expected_values = np.full((num_queries, k), fill, dtype=np.float64)
    expected_keys = np.zeros((num_queries, k) + keys.shape[2:], dtype=keys.dtype)
    ranking = numpy_stable_ranking(values, order)[:, :k]
    kept = min(k, num_entries)
    for query in range(num_queries):
        expected_values[query, :kept] = values[query, ranking[query]]
        expected_keys[query, :kept] = keys[query, ranking[query]]
    return expected_keys, expected_values


def test_order_members():
    assert ORDER.ASCENDING.value == 1
    assert ORDER.DESCENDING.value == 2
    assert set(ORDER) == {ORDER.ASCENDING, ORDER.DESCENDING}


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_stable_top_k_matches_numpy_stable_sort(order):
    rng = np.random.default_rng(0)
    # Few distinct values: many ties.
    values = rng.integers(-3, 4, size=(6, 17)).astype(np.float32)
    top_values, positions = stable_top_k(tf.constant(values), 7, order)
    expected_positions = numpy_stable_ranking(values, order)[:, :7]
    np.testing.assert_array_equal(positions.numpy(), expected_positions)
    np.testing.assert_array_equal(top_values.numpy(), np.take_along_axis(values, expected_positions, axis=1))
    assert top_values.dtype == tf.float32


def test_stable_top_k_small_example():
    values = tf.constant([[2.0, 5.0, 2.0, 5.0, 1.0]])
    top_values, positions = stable_top_k(values, 3, ORDER.DESCENDING)
    np.testing.assert_array_equal(top_values.numpy(), [[5.0, 5.0, 2.0]])
    np.testing.assert_array_equal(positions.numpy(), [[1, 3, 0]])
    top_values, positions = stable_top_k(values, 4, ORDER.ASCENDING)
    np.testing.assert_array_equal(top_values.numpy(), [[1.0, 2.0, 2.0, 5.0]])
    np.testing.assert_array_equal(positions.numpy(), [[4, 0, 2, 1]])


def test_stable_top_k_rejects_bad_order():
    with pytest.raises(TypeError):
        stable_top_k(tf.constant([[1.0, 2.0]]), 1, "descending")


def test_batch_sort_descending_hand_example():
    """Kept entries beat new ones on ties; within a batch the earlier position wins."""
    sorter = BatchSort(batch_shape=(2,), k_shape=(1, 3))
    keys_1 = tf.constant([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    sorter.add_all(keys_1, tf.constant([[3.0, 1.0, 3.0]]))
    keys, values = sorter.get()
    np.testing.assert_array_equal(values.numpy(), [[3.0, 3.0, 1.0]])
    np.testing.assert_array_equal(keys.numpy(), [[[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]]])

    keys_2 = tf.constant([[[4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]])
    sorter.add_all(keys_2, tf.constant([[3.0, 5.0, 1.0]]))
    keys, values = sorter.get()
    np.testing.assert_array_equal(values.numpy(), [[5.0, 3.0, 3.0]])
    # The new 3.0 (key 4) loses against the two kept 3.0 (keys 1 and 3).
    np.testing.assert_array_equal(keys.numpy(), [[[5.0, 5.0], [1.0, 1.0], [3.0, 3.0]]])


def test_batch_sort_ascending_hand_example():
    sorter = BatchSort(batch_shape=(), k_shape=(1, 2), order=ORDER.ASCENDING)
    sorter.add_all(tf.constant([[10.0, 20.0, 30.0]]), tf.constant([[0.5, -1.0, -1.0]]))
    keys, values = sorter.get()
    np.testing.assert_array_equal(values.numpy(), [[-1.0, -1.0]])
    np.testing.assert_array_equal(keys.numpy(), [[20.0, 30.0]])
    sorter.add_all(tf.constant([[40.0, 50.0]]), tf.constant([[-1.0, -2.0]]))
    keys, values = sorter.get()
    np.testing.assert_array_equal(values.numpy(), [[-2.0, -1.0]])
    np.testing.assert_array_equal(keys.numpy(), [[50.0, 20.0]])


def test_batch_sort_several_queries_hand_example():
    sorter = BatchSort(batch_shape=(), k_shape=(2, 2))
    keys = tf.constant([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    sorter.add_all(keys, tf.constant([[0.1, 0.3, 0.2], [9.0, 7.0, 8.0]]))
    best_keys, best_values = sorter.get()
    np.testing.assert_allclose(best_values.numpy(), [[0.3, 0.2], [9.0, 8.0]], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(best_keys.numpy(), [[2.0, 3.0], [1.0, 3.0]])


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_batch_sort_random_stream_matches_numpy(order):
    rng = np.random.default_rng(1)
    num_queries, k, key_shape = 4, 6, (3, 2)
    batch_lengths = [5, 1, 7, 5, 2]
    sorter = BatchSort(batch_shape=key_shape, k_shape=(num_queries, k), order=order)
    all_keys, all_values = [], []
    next_id = 0
    for length in batch_lengths:
        # Unique keys (the entry's position in the stream) so that the chosen entries can be identified.
        ids = np.arange(next_id, next_id + length, dtype=np.float32)
        next_id += length
        keys = np.broadcast_to(ids[None, :, None, None] * np.ones(key_shape, np.float32),
                               (num_queries, length) + key_shape).copy()
        keys += rng.normal(size=keys.shape).astype(np.float32) * 1e-3  # keys differ across queries too
        values = rng.integers(0, 4, size=(num_queries, length)).astype(np.float32)  # many ties
        sorter.add_all(tf.constant(keys), tf.constant(values))
        all_keys.append(keys)
        all_values.append(values)

    expected_keys, expected_values = numpy_stream_top_k(np.concatenate(all_keys, axis=1),
                                                        np.concatenate(all_values, axis=1), k, order)
    keys, values = sorter.get()
    assert keys.shape == (num_queries, k) + key_shape
    assert values.shape == (num_queries, k)
    np.testing.assert_array_equal(values.numpy(), expected_values)
    np.testing.assert_array_equal(keys.numpy(), expected_keys)


@pytest.mark.parametrize("order, fill", [(ORDER.DESCENDING, -np.inf), (ORDER.ASCENDING, np.inf)])
def test_batch_sort_fewer_entries_than_k(order, fill):
    sorter = BatchSort(batch_shape=(2,), k_shape=(2, 5), order=order)
    keys, values = sorter.get()
    np.testing.assert_array_equal(keys.numpy(), np.zeros((2, 5, 2)))
    np.testing.assert_array_equal(values.numpy(), np.full((2, 5), fill))

    new_keys = np.array([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]],
                         [[4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]], dtype=np.float32)
    new_values = np.array([[1.0, 3.0, 2.0], [-1.0, -1.0, 0.0]], dtype=np.float32)
    sorter.add_all(tf.constant(new_keys), tf.constant(new_values))
    expected_keys, expected_values = numpy_stream_top_k(new_keys, new_values, 5, order)
    keys, values = sorter.get()
    np.testing.assert_array_equal(values.numpy(), expected_values)
    np.testing.assert_array_equal(keys.numpy(), expected_keys)
    assert np.all(values.numpy()[:, 3:] == fill)
    assert np.all(keys.numpy()[:, 3:] == 0.0)


def test_batch_sort_int_keys_and_float64_values():
    sorter = BatchSort(batch_shape=(), k_shape=(1, 3), dtype=tf.float64, key_dtype=tf.int32)
    sorter.add_all(tf.constant([[7, 8, 9, 10]], tf.int32), tf.constant([[0.25, 0.75, 0.5, 0.75]], tf.float64))
    keys, values = sorter.get()
    assert keys.dtype == tf.int32
    assert values.dtype == tf.float64
    np.testing.assert_array_equal(keys.numpy(), [[8, 10, 9]])
    np.testing.assert_array_equal(values.numpy(), [[0.75, 0.75, 0.5]])


def test_batch_sort_keys_share_value_dtype_by_default():
    sorter = BatchSort(batch_shape=(3,), k_shape=(2, 4), dtype=tf.float64)
    keys, values = sorter.get()
    assert keys.dtype == tf.float64 and values.dtype == tf.float64
    assert keys.shape == (2, 4, 3) and values.shape == (2, 4)


def test_batch_sort_reset():
    sorter = BatchSort(batch_shape=(), k_shape=(1, 2))
    sorter.add_all(tf.constant([[1.0, 2.0]]), tf.constant([[5.0, 6.0]]))
    sorter.reset()
    keys, values = sorter.get()
    np.testing.assert_array_equal(keys.numpy(), [[0.0, 0.0]])
    np.testing.assert_array_equal(values.numpy(), [[-np.inf, -np.inf]])
    sorter.add_all(tf.constant([[3.0]]), tf.constant([[-7.0]]))
    keys, values = sorter.get()
    np.testing.assert_array_equal(keys.numpy(), [[3.0, 0.0]])
    np.testing.assert_array_equal(values.numpy(), [[-7.0, -np.inf]])


@pytest.mark.parametrize("k_shape", [(3,), (2, 0), (2, -1), (1, 2, 3)])
def test_batch_sort_rejects_bad_k_shape(k_shape):
    with pytest.raises(ValueError):
        BatchSort(batch_shape=(2,), k_shape=k_shape)


@pytest.mark.parametrize("order", ["DESCENDING", 2, None])
def test_batch_sort_rejects_non_order(order):
    with pytest.raises(TypeError):
        BatchSort(batch_shape=(2,), k_shape=(1, 2), order=order)


def test_batch_sort_rejects_mismatched_shapes():
    sorter = BatchSort(batch_shape=(2,), k_shape=(1, 2))
    with pytest.raises(ValueError):
        sorter.add_all(tf.zeros((1, 3, 2)), tf.zeros((1, 4)))
    with pytest.raises(ValueError):
        sorter.add_all(tf.zeros((1, 3, 2)), tf.zeros((3,)))
