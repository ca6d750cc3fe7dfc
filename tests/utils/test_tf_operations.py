"""Tests of ``deel.influenciae.utils.tf_operations``: layer lookup, model splitting and dataset helpers."""
# pylint: disable=missing-function-docstring
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.utils import (array_to_dataset, assert_batched_dataset, assert_known_cardinality, batch_sizes,
                                    dataset_size, dataset_to_tensor, default_process_batch, extract_only_values,
                                    find_layer, from_layer_name_to_layer_idx, get_device, is_dataset_batched,
                                    map_to_device, split_model, split_model_shared)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def dense_sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(5, activation="relu", name="d0"),
                             keras.layers.Dense(3, activation="tanh", name="d1"),
                             keras.layers.Dense(2, name="d2")])


def dense_functional():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu", name="d0")(inputs)
    hidden = keras.layers.Dense(3, activation="tanh", name="d1")(hidden)
    outputs = keras.layers.Dense(2, name="d2")(hidden)
    return keras.Model(inputs, outputs)


def conv_sequential():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((6, 6, 2)),
                             keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
                             keras.layers.MaxPooling2D(2, name="pool"),
                             keras.layers.Flatten(name="flatten"),
                             keras.layers.Dense(4, activation="relu", name="dense"),
                             keras.layers.Dense(2, name="logits")])


def conv_functional():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2))
    hidden = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    hidden = keras.layers.MaxPooling2D(2, name="pool")(hidden)
    hidden = keras.layers.Flatten(name="flatten")(hidden)
    hidden = keras.layers.Dense(4, activation="relu", name="dense")(hidden)
    outputs = keras.layers.Dense(2, name="logits")(hidden)
    return keras.Model(inputs, outputs)


def skip_functional():
    """d0 -> d1 -> d2 -> add(d0, d2) -> d3: the skip connection goes around d1 and d2."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((4,))
    first = keras.layers.Dense(3, name="d0")(inputs)
    hidden = keras.layers.Dense(3, name="d1")(first)
    hidden = keras.layers.Dense(3, name="d2")(hidden)
    merged = keras.layers.Add(name="add")([first, hidden])
    outputs = keras.layers.Dense(2, name="d3")(merged)
    return keras.Model(inputs, outputs)


def inputs_for(model, seed=0, batch=5):
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def apply_layers(layers, inputs):
    outputs = inputs
    for layer in layers:
        outputs = layer(outputs)
    return np.asarray(outputs)


def randomise_weights(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# find_layer / from_layer_name_to_layer_idx
# --------------------------------------------------------------------------------------------------
def test_find_layer_sequential():
    model = dense_sequential()
    assert [layer.name for layer in model.layers] == ["d0", "d1", "d2"]
    assert find_layer(model, "d1") is model.layers[1]
    assert find_layer(model, 0) is model.layers[0]
    assert find_layer(model, 2) is model.layers[2]
    assert find_layer(model, -1) is model.layers[2]
    assert find_layer(model, -3) is model.layers[0]
    assert find_layer(model, np.int64(1)) is model.layers[1]


def test_find_layer_functional_counts_the_input_layer():
    model = dense_functional()
    assert isinstance(find_layer(model, 0), keras.layers.InputLayer)
    assert find_layer(model, 1).name == "d0"
    assert find_layer(model, -1).name == "d2"
    assert find_layer(model, "d2") is model.layers[3]


@pytest.mark.parametrize("layer", ["missing", 3, -4, 100])
def test_find_layer_unknown(layer):
    with pytest.raises(ValueError):
        find_layer(dense_sequential(), layer)


@pytest.mark.parametrize("layer", [1.0, None, True, ["d0"]])
def test_find_layer_wrong_type(layer):
    with pytest.raises(TypeError):
        find_layer(dense_sequential(), layer)


def test_from_layer_name_to_layer_idx():
    assert from_layer_name_to_layer_idx(dense_sequential(), "d0") == 0
    assert from_layer_name_to_layer_idx(dense_sequential(), "d2") == 2
    assert from_layer_name_to_layer_idx(dense_functional(), "d0") == 1
    assert from_layer_name_to_layer_idx(conv_functional(), "flatten") == 3
    with pytest.raises(ValueError, match="No such layer") as error:
        from_layer_name_to_layer_idx(dense_sequential(), "d9")
    assert "d1" in str(error.value)


# --------------------------------------------------------------------------------------------------
# split_model / split_model_shared
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [dense_sequential, conv_sequential])
def test_split_sequential_at_every_layer(build):
    model = build()
    inputs = inputs_for(model)
    reference = np.asarray(model(inputs))
    for index in range(len(model.layers)):
        extractor, head = split_model(model, index)
        features = np.asarray(extractor(inputs))
        np.testing.assert_allclose(features, apply_layers(model.layers[:index], inputs), rtol=0, atol=1e-6)
        if index > 0:
            np.testing.assert_allclose(features, np.asarray(keras.Sequential(model.layers[:index])(inputs)),
                                       rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(head(features)), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [dense_functional, conv_functional])
def test_split_functional_at_every_layer(build):
    model = build()
    inputs = inputs_for(model, seed=1)
    reference = np.asarray(model(inputs))
    for index in range(1, len(model.layers)):
        extractor, head = split_model(model, index)
        features = np.asarray(extractor(inputs))
        np.testing.assert_allclose(features, apply_layers(model.layers[1:index], inputs), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(head(features)), reference, rtol=0, atol=1e-6)


def test_split_by_name_negative_index_and_layer_object():
    model = conv_functional()
    inputs = inputs_for(model, seed=2)
    expected_features = apply_layers(model.layers[1:4], inputs)  # conv, pool, flatten
    for target in ("dense", -2, model.layers[4]):
        extractor, head = split_model(model, target)
        features = np.asarray(extractor(inputs))
        assert features.shape == (5, 12)
        np.testing.assert_allclose(features, expected_features, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(head(features)), np.asarray(model(inputs)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [dense_sequential, conv_functional])
def test_split_model_returns_copies(build):
    model = build()
    inputs = inputs_for(model, seed=3)
    reference = np.asarray(model(inputs))
    extractor, head = split_model(model, -2)
    features_before = np.asarray(extractor(inputs))
    original_ids = {id(variable) for variable in model.weights}
    assert not original_ids & {id(variable) for variable in extractor.weights + head.weights}

    randomise_weights(model, seed=5)
    assert np.max(np.abs(np.asarray(model(inputs)) - reference)) > 1e-3
    np.testing.assert_allclose(np.asarray(extractor(inputs)), features_before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(head(extractor(inputs))), reference, rtol=0, atol=1e-6)


def test_split_around_skip_connection_fails():
    model = skip_functional()
    # The input of d2 (d1's output) does not determine the output: add also needs d0's output.
    with pytest.raises(ValueError, match="cut"):
        split_model(model, "d2")
    with pytest.raises(ValueError, match="cut"):
        split_model_shared(model, "d2")


def test_split_skip_model_where_the_graph_is_cut():
    """At d1 the skip connection starts from d1's own input, so everything after depends on that one tensor."""
    model = skip_functional()
    inputs = inputs_for(model, seed=4)
    extractor, head = split_model(model, "d1")
    np.testing.assert_allclose(np.asarray(extractor(inputs)), apply_layers(model.layers[1:2], inputs),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(head(extractor(inputs))), np.asarray(model(inputs)), rtol=0, atol=1e-6)


def test_split_at_input_layer_fails():
    with pytest.raises(ValueError):
        split_model_shared(dense_functional(), 0)


def test_split_unbuilt_model_fails_with_value_error():
    """DESIGN section 5 / split_model_shared docstring: a model without known inputs -> ValueError."""
    unbuilt = keras.Sequential([keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    with pytest.raises(ValueError):
        split_model_shared(unbuilt, 1)
    with pytest.raises(ValueError):
        split_model(unbuilt, "b")


def test_split_sequential_built_by_a_call():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.layers.Dense(3, activation="relu", name="a"), keras.layers.Dense(2, name="b")])
    inputs = np.random.default_rng(9).normal(size=(4, 5)).astype(np.float32)
    reference = np.asarray(model(inputs))
    extractor, head = split_model(model, "b")
    np.testing.assert_allclose(np.asarray(extractor(inputs)), apply_layers(model.layers[:1], inputs), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(head(extractor(inputs))), reference, rtol=0, atol=1e-6)


def test_split_unknown_layer_fails():
    with pytest.raises(ValueError):
        split_model(dense_sequential(), "nope")


def test_split_model_shared_shares_variables():
    model = conv_functional()
    inputs = inputs_for(model, seed=6)
    extractor, head = split_model_shared(model, "dense")
    model_ids = {id(variable) for variable in model.weights}
    assert {id(variable) for variable in extractor.weights} | {id(variable) for variable in head.weights} == model_ids
    assert model.get_layer("dense").kernel is head.get_layer("dense").kernel
    np.testing.assert_allclose(np.asarray(head(extractor(inputs))), np.asarray(model(inputs)), rtol=0, atol=1e-6)

    randomise_weights(model, seed=7)
    np.testing.assert_allclose(np.asarray(head(extractor(inputs))), np.asarray(model(inputs)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(extractor(inputs)), apply_layers(model.layers[1:4], inputs),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("build, target", [(dense_sequential, 0), (dense_sequential, "d0"),
                                           (dense_functional, 1), (dense_functional, "d0")])
def test_split_model_shared_at_first_layer(build, target):
    model = build()
    extractor, head = split_model_shared(model, target)
    assert extractor is None
    assert head is model


def test_split_model_at_first_layer_gives_identity_extractor():
    model = dense_functional()
    inputs = inputs_for(model, seed=8)
    extractor, head = split_model(model, "d0")
    np.testing.assert_allclose(np.asarray(extractor(inputs)), inputs, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(head(inputs)), np.asarray(model(inputs)), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Dataset helpers
# --------------------------------------------------------------------------------------------------
def xy_arrays(size=23, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, 8, 8)).astype(np.float32), rng.integers(0, 3, size=size).astype(np.int64)


def xy_dataset(size=23):
    return tf.data.Dataset.from_tensor_slices(xy_arrays(size))


def test_is_dataset_batched_true():
    batched = xy_dataset().batch(5)
    assert is_dataset_batched(batched) is True
    assert is_dataset_batched(batched.map(lambda x, y: (2 * x, y))) is True
    assert is_dataset_batched(batched.prefetch(2)) is True
    assert is_dataset_batched(batched.cache()) is True
    assert is_dataset_batched(tf.data.Dataset.from_tensor_slices(np.zeros((7, 3))).batch(2)) is True


def test_is_dataset_batched_drop_remainder_gives_size_single_tensor():
    size = is_dataset_batched(tf.data.Dataset.from_tensor_slices(np.zeros((7, 3))).batch(2, drop_remainder=True))
    assert size == 2 and isinstance(size, int) and not isinstance(size, bool)


def test_is_dataset_batched_drop_remainder_gives_size_tuple():
    size = is_dataset_batched(xy_dataset().batch(5, drop_remainder=True))
    assert size == 5 and isinstance(size, int) and not isinstance(size, bool)
    assert is_dataset_batched(xy_dataset().batch(4, drop_remainder=True).map(lambda x, y: (x, y))) == 4


def test_is_dataset_batched_false():
    assert is_dataset_batched(xy_dataset()) is False
    assert is_dataset_batched(xy_dataset().batch(5).unbatch()) is False
    assert is_dataset_batched(tf.data.Dataset.range(4)) is False
    for not_a_dataset in (np.zeros((4, 3)), tf.zeros((4, 3)), [1, 2], None):
        assert is_dataset_batched(not_a_dataset) is False


def test_is_dataset_batched_false_for_unbatched_non_scalar_elements():
    """Unbatched datasets whose elements all have a leading dimension of the same size are still unbatched."""
    rng = np.random.default_rng(0)
    features_only = tf.data.Dataset.from_tensor_slices(rng.normal(size=(10, 3)))
    one_hot_pairs = tf.data.Dataset.from_tensor_slices((rng.normal(size=(10, 4)), np.eye(4)[np.arange(10) % 4]))
    for dataset in (features_only, one_hot_pairs, array_to_dataset(rng.normal(size=(10, 8, 8)))):
        assert is_dataset_batched(dataset) is False
        with pytest.raises(ValueError, match="train_set"):
            assert_batched_dataset(dataset, name="train_set")


def test_assert_batched_dataset():
    assert_batched_dataset(xy_dataset().batch(5))
    with pytest.raises(ValueError, match="train_set"):
        assert_batched_dataset(xy_dataset(), name="train_set")
    with pytest.raises(ValueError, match="dataset"):
        assert_batched_dataset(xy_dataset())
    with pytest.raises(TypeError, match="eval_set"):
        assert_batched_dataset(np.zeros((4, 2)), name="eval_set")


def test_dataset_size_and_batch_sizes():
    batched = xy_dataset().batch(5)
    assert dataset_size(batched) == 23
    assert dataset_size(batched.map(lambda x, y: (x, y)).prefetch(1)) == 23
    assert dataset_size(xy_dataset().batch(5, drop_remainder=True)) == 20
    assert dataset_size(tf.data.Dataset.from_tensor_slices(np.ones((7, 2))).batch(7)) == 7
    np.testing.assert_array_equal(batch_sizes(batched), [5, 5, 5, 5, 3])
    assert assert_known_cardinality(batched) == 5


def test_dataset_size_errors():
    batched = xy_dataset().batch(5)
    with pytest.raises(ValueError):
        dataset_size(batched.filter(lambda x, y: y >= 0))
    with pytest.raises(ValueError):
        dataset_size(batched.repeat())
    with pytest.raises(ValueError):
        dataset_size(xy_dataset())
    with pytest.raises(ValueError, match="train_set"):
        assert_known_cardinality(batched.repeat(), name="train_set")
    with pytest.raises(ValueError):
        batch_sizes(batched.filter(lambda x, y: y >= 0))


def test_dataset_to_tensor():
    inputs, labels = xy_arrays()
    concatenated = dataset_to_tensor(tf.data.Dataset.from_tensor_slices(inputs).batch(5))
    np.testing.assert_array_equal(concatenated.numpy(), inputs)

    pair = dataset_to_tensor(xy_dataset().batch(5))
    assert isinstance(pair, tuple) and len(pair) == 2
    np.testing.assert_array_equal(pair[0].numpy(), inputs)
    np.testing.assert_array_equal(pair[1].numpy(), labels)
    assert pair[1].dtype == tf.int64

    with pytest.raises(ValueError):
        dataset_to_tensor(xy_dataset())
    with pytest.raises(ValueError):
        dataset_to_tensor(xy_dataset().batch(5).take(0))


def test_extract_only_values():
    inputs, labels = xy_arrays(size=9)
    values = np.arange(9, dtype=np.float32)[:, None] * 0.5
    dataset = tf.data.Dataset.from_tensor_slices(((inputs, labels), values)).batch(4)
    np.testing.assert_array_equal(extract_only_values(dataset).numpy(), values)


def test_array_to_dataset_single_array():
    array = np.random.default_rng(1).normal(size=(11, 3))  # float64
    dataset = array_to_dataset(array)
    assert dataset.element_spec.dtype == tf.float32
    np.testing.assert_allclose(np.stack(list(dataset.as_numpy_iterator())), array.astype(np.float32))

    batched = array_to_dataset(array, batch_size=4)
    assert is_dataset_batched(batched)
    np.testing.assert_array_equal(batch_sizes(batched), [4, 4, 3])
    np.testing.assert_array_equal(dataset_to_tensor(batched).numpy(), array.astype(np.float32))


def test_array_to_dataset_tuple_of_different_shapes():
    inputs = np.random.default_rng(2).normal(size=(10, 3, 2))
    labels = np.arange(10, dtype=np.int64)
    dataset = array_to_dataset((inputs, labels), batch_size=3)
    assert dataset.element_spec[0].dtype == tf.float32
    assert dataset.element_spec[1].dtype == tf.int64
    assert dataset_size(dataset) == 10
    got_inputs, got_labels = dataset_to_tensor(dataset)
    np.testing.assert_array_equal(got_inputs.numpy(), inputs.astype(np.float32))
    np.testing.assert_array_equal(got_labels.numpy(), labels)


def test_array_to_dataset_shuffle_keeps_the_pairs():
    inputs = np.random.default_rng(3).normal(size=(40, 2)).astype(np.float32)
    labels = np.arange(40, dtype=np.int32)
    dataset = array_to_dataset((inputs, labels), batch_size=8, shuffle=True, buffer_size=100, seed=7)
    got_inputs, got_labels = (tensor.numpy() for tensor in dataset_to_tensor(dataset))
    assert got_labels.dtype == np.int32
    assert not np.array_equal(got_labels, labels)  # actually shuffled
    np.testing.assert_array_equal(np.sort(got_labels), labels)  # same multiset
    np.testing.assert_array_equal(got_inputs, inputs[got_labels])  # rows stay paired with their labels

    again = array_to_dataset((inputs, labels), batch_size=8, shuffle=True, buffer_size=100, seed=7)
    np.testing.assert_array_equal(dataset_to_tensor(again)[1].numpy(), got_labels)  # seeded: reproducible


def test_default_process_batch():
    inputs, targets, weights = tf.ones((2, 3)), tf.zeros((2,)), tf.constant([0.5, 2.0])
    got = default_process_batch((inputs, targets))
    assert got[0] is inputs and got[1] is targets and got[2] is None
    got = default_process_batch((inputs, targets, weights))
    assert got[0] is inputs and got[1] is targets and got[2] is weights
    got = default_process_batch([inputs, targets])
    assert got[0] is inputs and got[1] is targets and got[2] is None
    for bad in (inputs, (inputs,), ()):
        with pytest.raises(ValueError):
            default_process_batch(bad)


def test_get_device():
    expected = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    assert get_device(None) == expected
    assert get_device() == expected
    assert get_device("CPU:0") == "CPU:0"


def test_map_to_device():
    inputs, labels = xy_arrays(size=7)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(3)
    mapped = map_to_device(dataset, lambda x, y: (tf.reduce_sum(x, axis=[1, 2]), y + 1), device="CPU:0")
    sums, shifted = dataset_to_tensor(mapped)
    np.testing.assert_allclose(sums.numpy(), inputs.sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shifted.numpy(), labels + 1)
    # the lazily computed results run their kernels without tf.data's autotuning thread (see lazy_map)
    assert dataset.options().autotune.enabled is not False and mapped.options().autotune.enabled is False


def test_lazy_results_of_calculators_switch_autotuning_off():
    """The reference-style lazy results (a tf.data map) run with autotuning off, and keep their values."""
    from deel.influenciae.common import InfluenceModel  # pylint: disable=import-outside-toplevel
    from deel.influenciae.trac_in import TracIn  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    rng = np.random.default_rng(0)
    train = tf.data.Dataset.from_tensor_slices((rng.normal(size=(5, 3)).astype(np.float32),
                                                rng.integers(0, 2, 5))).batch(2)
    tracin = TracIn([InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)], [0.5])
    lazy = tracin.compute_influence_values(train)
    assert lazy.options().autotune.enabled is False
    values = np.concatenate([batch_values.numpy()[:, 0] for _, batch_values in lazy])
    np.testing.assert_allclose(values, tracin.self_influence(train).numpy(), rtol=1e-6)


def test_compute_batches_keeps_the_elements_and_switches_autotuning_off():
    from deel.influenciae.utils.tf_operations import compute_batches  # pylint: disable=import-outside-toplevel
    dataset = tf.data.Dataset.range(10).map(lambda v: v * 2, num_parallel_calls=tf.data.AUTOTUNE).batch(3)
    assert dataset.options().autotune.enabled is not False
    computed = compute_batches(dataset)
    assert computed.options().autotune.enabled is False
    assert [batch.numpy().tolist() for batch in computed] == [batch.numpy().tolist() for batch in dataset]
    assert int(computed.cardinality()) == 4


def test_compute_batches_builds_the_untuned_dataset_once_and_finds_non_finite_values_on_the_host():
    """The dataset without autotuning is built once per input dataset; the host-memory check (NumPy) finds NaN
    and inf in float16/32/64 inputs and float targets, naming the batch and the sample."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.utils.batch_checks import compute_batches, untuned
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((4, 2), np.float32)).batch(2)
    assert untuned(dataset) is untuned(dataset) and untuned(dataset).options().autotune.enabled is False
    for dtype in (np.float16, np.float32, np.float64):
        for component, value in ((0, np.nan), (1, -np.inf)):
            columns = [np.ones((5, 3), dtype), np.ones((5, 1), dtype)]
            columns[component][3, 0] = value
            spoiled = tf.data.Dataset.from_tensor_slices(tuple(columns)).batch(2)
            with pytest.raises(ValueError, match=f"(inputs|targets) \\(element {component}\\) of batch 1 of "
                                                 "spoiled, sample 3 of spoiled"):
                list(compute_batches(spoiled, "spoiled"))
