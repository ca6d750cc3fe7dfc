"""The digits data and model builders shared by the benchmark, the demo and the scripts of ``benchmarks/``."""
import keras
import numpy as np
import pytest

from deel.influenciae.benchmark.digits import (DIGITS_SAMPLES, build_mlp, load_digits_arrays, load_digits_split,
                                               one_hot, train_classifier)
from deel.influenciae.demo_data import detection_figures, load_noisy_digits


def test_arrays_are_scaled_and_reshaped():
    inputs, labels = load_digits_arrays()
    assert inputs.shape == (DIGITS_SAMPLES, 64) and inputs.dtype == np.float32
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    images, _ = load_digits_arrays((8, 8, 1))
    np.testing.assert_array_equal(images.reshape(-1, 64), inputs)
    with pytest.raises(ValueError, match="64"):
        load_digits_arrays((8, 7))


def test_split_conventions_follow_one_seeded_permutation():
    inputs, labels = load_digits_arrays()
    order = np.random.default_rng(0).permutation(DIGITS_SAMPLES)
    test_first = load_digits_split(0)  # the benchmark's and the demo's: round(0.2 N) test samples first
    np.testing.assert_array_equal(test_first.test_index, order[:359])
    np.testing.assert_array_equal(test_first.train_index, order[359:])
    train_first = load_digits_split(0, n_train=1437, n_test=100, test_first=False)
    np.testing.assert_array_equal(train_first.train_index, order[:1437])
    np.testing.assert_array_equal(train_first.test_index, order[1437:1537])
    np.testing.assert_array_equal(train_first.x_train, inputs[order[:1437]])
    np.testing.assert_array_equal(train_first.y_test, labels[order[1437:1537]])
    rest = load_digits_split(0, n_train=1437, test_first=False)
    np.testing.assert_array_equal(rest.test_index, order[1437:])
    assert not set(rest.train_index) & set(rest.test_index)


def test_split_from_a_generator_advances_it():
    rng, reference = np.random.default_rng(5), np.random.default_rng(5)
    split = load_digits_split(rng, n_test=10, n_train=20)
    np.testing.assert_array_equal(split.test_index, reference.permutation(DIGITS_SAMPLES)[:10])
    assert rng.integers(0, 1000) == reference.integers(0, 1000)


def test_take_arrays_and_errors():
    split = load_digits_split(3, input_shape=(8, 8, 1)).take(50, 20)
    assert split.x_train.shape == (50, 8, 8, 1) and split.x_test.shape == (20, 8, 8, 1)
    arrays = split.arrays(as_one_hot=True)
    assert arrays["y_train"].shape == (50, 10) and arrays["y_train"].dtype == np.float32
    np.testing.assert_array_equal(np.argmax(arrays["y_test"], axis=1), split.y_test)
    assert split.arrays()["y_train"].dtype == np.int64
    np.testing.assert_array_equal(one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="test_ratio"):
        load_digits_split(0, test_ratio=1.0)
    with pytest.raises(ValueError, match="1797"):
        load_digits_split(0, n_train=1700, n_test=200, test_first=False)


def test_build_mlp_architecture():
    model = build_mlp((8, 8), (16, 8), 10, output_bias=False, l2=1e-3, layer_names=("first", "second", "logits"))
    assert [type(layer).__name__ for layer in model.layers] == ["Flatten", "Dense", "Dense", "Dense"]
    assert [layer.name for layer in model.layers[1:]] == ["first", "second", "logits"]
    assert [layer.units for layer in model.layers[1:]] == [16, 8, 10]
    assert model.layers[-1].bias is None and model.layers[1].bias is not None
    assert model.layers[-1].activation.__name__ == "linear"
    assert all(isinstance(layer.kernel_regularizer, keras.regularizers.L2) for layer in model.layers[1:])
    assert tuple(model.output_shape) == (None, 10)
    tanh = build_mlp(hidden_units=4, activation="tanh")
    assert [type(layer).__name__ for layer in tanh.layers] == ["Dense", "Dense"]
    assert tanh.layers[0].activation.__name__ == "tanh"
    with pytest.raises(ValueError, match="layer_names"):
        build_mlp(hidden_units=4, layer_names=("only",))


def test_build_mlp_seed_and_weights():
    first, second = build_mlp(hidden_units=8, seed=3), build_mlp(hidden_units=8, seed=3)
    for left, right in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(left, right)
    loaded = build_mlp(hidden_units=8, weights=first.get_weights())
    for left, right in zip(first.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(left, right)


def test_train_classifier_takes_integer_or_one_hot_labels():
    split = load_digits_split(0).take(64, 16)
    sparse = build_mlp(hidden_units=8, seed=1)
    history = train_classifier(sparse, split.x_train, split.y_train, epochs=2, batch_size=32, shuffle=False)
    dense = build_mlp(hidden_units=8, seed=1)
    train_classifier(dense, split.x_train, one_hot(split.y_train), epochs=2, batch_size=32, shuffle=False,
                     metrics=["accuracy"])
    assert len(history.history["loss"]) == 2
    assert isinstance(sparse.loss, keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(dense.loss, keras.losses.CategoricalCrossentropy)
    for left, right in zip(sparse.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(left, right, atol=1e-5)


def test_demo_flips_labels_after_the_shared_split():
    data = load_noisy_digits(0, 0.05)
    split = load_digits_split(0, input_shape=(8, 8))
    np.testing.assert_array_equal(data.x_train, split.x_train)
    np.testing.assert_array_equal(data.y_train_true, split.y_train)
    assert len(data.flipped) == 72 and np.all(data.y_train_given[data.flipped] != data.y_train_true[data.flipped])
    unchanged = np.setdiff1d(np.arange(len(data.y_train_true)), data.flipped)
    np.testing.assert_array_equal(data.y_train_given[unchanged], data.y_train_true[unchanged])
    is_flipped = np.zeros(len(data.y_train_true), dtype=bool)
    is_flipped[data.flipped] = True
    perfect = detection_figures(is_flipped.astype(float), is_flipped)
    assert perfect == {"top_10pct": 1.0, "top_20pct": 1.0, "roc_auc": 1.0}
    with pytest.raises(ValueError, match="noise"):
        load_noisy_digits(0, 1.5)
