"""Per-layer factors of dense layers against per-sample tapes, and their fallbacks."""
from typing import Optional

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import BaseInfluenceModel, InfluenceModel
from deel.influenciae.trac_in import TracIn
from tests.per_sample import tape_gradients

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def per_sample_tapes(model, x, y):
    """Ground truth: one GradientTape per sample, flattened like the library's layout."""
    return tape_gradients(model, LOSS, x, y)


def mlp(seed, sizes=(5, 4, 3)):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((sizes[0],))]
    layers += [keras.layers.Dense(width, activation="tanh") for width in sizes[1:-1]]
    return keras.Sequential(layers + [keras.layers.Dense(sizes[-1])])


def test_factored_products_match_per_sample_tapes():
    model = mlp(0, (5, 6, 4, 3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)).astype(np.float32), rng.integers(0, 3, 9)
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors(
        (tf.constant(x), tf.constant(y)))
    assert len(factors.layers) == 3 and sum(len(layer.weights) for layer in factors.layers) == 6  # 3 kernels, 3 biases
    assert not factors.materialised
    gradients = per_sample_tapes(model, x, y)
    scale = 0.5
    np.testing.assert_allclose(scale * factors.pairwise(factors).numpy(), 0.5 * gradients @ gradients.T,
                               rtol=1e-5, atol=1e-6 * np.abs(gradients @ gradients.T).max())
    np.testing.assert_allclose(scale * factors.squared_norms().numpy(), 0.5 * (gradients ** 2).sum(1),
                               rtol=1e-5)


def sequence_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6, 5)), keras.layers.Dense(4, activation="tanh"), keras.layers.Flatten(),
                             keras.layers.Dense(3)])


def shared_layer_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh")
    return keras.Model(inputs, keras.layers.Dense(3)(shared(shared(inputs))))


def conv_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(),
                             keras.layers.Dense(3)])


@pytest.mark.parametrize("build, shape", [(sequence_model, (6, 5)), (shared_layer_model, (5,)),
                                          (conv_model, (6, 6, 2))])
def test_sequences_shared_weights_and_convolutions_are_factored(build, shape):
    """Dense on sequences (T rows per sample), a weight used twice (its uses are more positions), convolutions
    (one patch per output position): factors whose products match per-sample tapes."""
    model = build()
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(4,) + shape).astype(np.float32), rng.integers(0, 3, 4)
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors(
        (tf.constant(x), tf.constant(y)))
    assert any(factor.kernel is not None and factor.positions > 1 for factor in factors.layers)
    gradients = per_sample_tapes(model, x, y)
    np.testing.assert_allclose(factors.pairwise(factors).numpy(),
                               gradients @ gradients.T, rtol=1e-5, atol=1e-6 * np.abs(gradients @ gradients.T).max())


def embedding_model():
    keras.utils.set_random_seed(8)
    return keras.Sequential([keras.Input((7,), dtype="int32"), keras.layers.Embedding(11, 4),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.mark.parametrize("build, expected", [(lambda: mlp(0), [1, 1]), (sequence_model, [6, 1]), (conv_model, [16, 1]),
                                             (embedding_model, [7, 1])])
def test_positions_stay_static_in_a_trace_for_any_batch_size(build, expected):
    """The passes are traced once for any batch size (an unknown first dimension): the number of positions per
    sample must stay static there, since it picks the product forms (a dense layer's rank-one products, forming a
    convolution's per-sample gradients before rotating them); a lost T once sent every convolution to the costlier
    form."""
    model = build()
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)
    shape, dtype = model.inputs[0].shape[1:], model.inputs[0].dtype
    seen = []

    def positions(inputs, labels):
        seen.append([factor.positions for factor in influence_model.layer_factors.in_graph((inputs, labels)).layers])
        return tf.zeros([])

    batch = (tf.zeros((3,) + tuple(shape), dtype), tf.zeros((3,), tf.int32))
    influence_model.layer_factors.plan_for(batch)
    tf.function(positions).get_concrete_function(tf.TensorSpec((None,) + tuple(shape), dtype),
                                                 tf.TensorSpec((None,), tf.int32))
    assert seen == [expected]


@pytest.mark.parametrize("factored", [True, False])
def test_tracin_matrix_and_self_influence_match_per_sample_tapes(factored):
    """TracIn over two checkpoints: the factored path (MLP) and the partly materialised one (rows that are not one
    per sample) both give Σ_k lr_k g_k(t)·g_k(z) and Σ_k lr_k ||g_k(z)||² of per-sample tapes."""
    rng = np.random.default_rng(5)
    shape = (5,) if factored else (6, 5)
    models = [mlp(seed) if factored else time_major_model() for seed in (6, 7)]
    if not factored:
        models[1].set_weights([w * 1.1 for w in models[0].get_weights()])
    x_train, y_train = rng.normal(size=(11,) + shape).astype(np.float32), rng.integers(0, 3, 11)
    x_test, y_test = rng.normal(size=(4,) + shape).astype(np.float32), rng.integers(0, 3, 4)
    rates = [0.3, 0.05]
    tracin = TracIn([InfluenceModel(m, start_layer=0, last_layer=-1, loss_function=LOSS) for m in models], rates)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(4)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3)
    expected_matrix = sum(rate * per_sample_tapes(m, x_test, y_test) @ per_sample_tapes(m, x_train, y_train).T
                          for rate, m in zip(rates, models))
    expected_self = sum(rate * (per_sample_tapes(m, x_train, y_train) ** 2).sum(1) for rate, m in zip(rates, models))
    matrix = tracin.estimate_influence_values_matrix(test, train).numpy()
    np.testing.assert_allclose(matrix, expected_matrix, rtol=1e-4, atol=1e-5 * np.abs(expected_matrix).max())
    np.testing.assert_allclose(tracin._compute_influence_values(train).numpy()[:, 0],  # pylint: disable=W0212
                               expected_self, rtol=1e-4)
    assert tracin._factored.supported is factored  # pylint: disable=protected-access


def test_an_error_in_the_data_propagates_and_keeps_the_factored_path():
    """A label out of range fails the batch (TensorFlow's error reaches the user) and changes nothing for the
    batches after it: the plan is made from the model's structure, never from an error."""
    model = mlp(8)
    rng = np.random.default_rng(9)
    x = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors
    with pytest.raises(tf.errors.InvalidArgumentError, match="label"):
        factors((x, tf.constant([0, 1, 2, 7, 0, 1])))
    assert factors.plan.fully_factored
    good = factors((x, tf.constant([0, 1, 2, 2, 0, 1])))
    assert good is not None and factors.plan.fully_factored
    gradients = per_sample_tapes(model, x.numpy(), np.array([0, 1, 2, 2, 0, 1]))
    np.testing.assert_allclose(good.squared_norms().numpy(), (gradients ** 2).sum(1),
                               rtol=1e-5)


class _TimeMajorRows(keras.layers.Layer):
    """(B, 6, 5) -> (6·B, 5), time-major: a dense layer after it sees rows that are not grouped by sample."""

    def call(self, inputs):
        return tf.reshape(tf.transpose(inputs, [1, 0, 2]), [-1, 5])


class _BackToSamples(keras.layers.Layer):
    def call(self, inputs):
        return tf.reshape(tf.transpose(tf.reshape(inputs, [6, -1, 4]), [1, 0, 2]), [-1, 6 * 4])


@pytest.mark.parametrize("watched", ["all", "last bias"])
def test_held_factor_bytes_are_known_from_the_traced_shapes(watched):
    """The bytes per sample of a batch's held factors, read from the traced function's output shapes without
    running it, are those of the factors computed."""
    model = conv_model()
    weights = model.trainable_weights if watched == "all" else [model.layers[-1].bias]
    factors = BaseInfluenceModel(model, weights, loss_function=LOSS).layer_factors
    rng = np.random.default_rng(5)
    batch = (tf.constant(rng.normal(size=(4, 6, 6, 2)), tf.float32), tf.constant(rng.integers(0, 3, 4)))
    per_sample = factors.tensors_bytes_per_sample(batch)
    held = [tensor for tensor in tf.nest.flatten(factors.tensors(batch)) if tensor is not None]
    assert per_sample * 4 == sum(int(tf.size(tensor)) * tensor.dtype.size for tensor in held) > 0


def check_two_checkpoint_conv_matrix(seed: int, scale: float, rates: tuple, budget: Optional[int] = None) -> None:
    """TracIn's matrix over two checkpoints of the small CNN (the second one's weights scaled by ``scale``), 5 test
    samples in batches of 2 against 7 training samples in batches of 3, equal to the one of per-sample tapes."""
    rng = np.random.default_rng(seed)
    models = [conv_model() for _ in range(2)]
    models[1].set_weights([w * scale for w in models[0].get_weights()])
    x_train, y_train = rng.normal(size=(7, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 7)
    x_test, y_test = rng.normal(size=(5, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 5)
    tracin = TracIn([InfluenceModel(m, start_layer=0, last_layer=-1, loss_function=LOSS) for m in models],
                    list(rates))
    if budget is not None:
        tracin.memory_budget_bytes = budget
    matrix = tracin.influence_matrix(tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(2),
                                     tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(3)).numpy()
    expected = sum(rate * per_sample_tapes(m, x_test, y_test) @ per_sample_tapes(m, x_train, y_train).T
                   for rate, m in zip(rates, models))
    np.testing.assert_allclose(matrix, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("budget, minimum, held", [(2 ** 30, 0, True), (64, 0, False), (2 ** 30, None, False)])
def test_tracin_matrix_holds_the_test_factors_when_they_fit(monkeypatch, budget, minimum, held):
    """The test batches' factors are computed once and held for the pass when they fit a quarter of
    ``memory_budget_bytes`` (and are not tiny: ``HELD_FACTORS_MIN_BYTES``), else recomputed with every training
    batch: the same matrix as per-sample tapes either way."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.trac_in import tracin as tracin_module
    from deel.influenciae.common import memory
    from deel.influenciae.trac_in.factored import FactoredTracInKernels
    if minimum is not None:
        monkeypatch.setattr(tracin_module, "HELD_FACTORS_MIN_BYTES", minimum)
    monkeypatch.setattr(memory, "MERGED_BATCH_BYTES", 0)  # one call per training batch
    calls = []
    original = FactoredTracInKernels.pairwise_with_held
    monkeypatch.setattr(FactoredTracInKernels, "pairwise_with_held",
                        lambda self, *args: calls.append(1) or original(self, *args))
    check_two_checkpoint_conv_matrix(11, 0.9, (0.2, 0.7), budget)
    assert bool(calls) is held
    if held:
        assert len(calls) == 3 * 3  # 3 test batches for each of the 3 training batches


@pytest.mark.parametrize("merged_bytes, train_rows", [(0, [3, 3, 1]), (None, [7])])
def test_tracin_matrix_merges_small_training_batches(monkeypatch, merged_bytes, train_rows):
    """On a model this small the training batches are merged into one call (by default); with merging off, one
    call per training batch. The test factors, smaller than ``HELD_FACTORS_MIN_BYTES`` by their traced shapes, are
    not computed apart. The same matrix as per-sample tapes either way."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.common import memory
    from deel.influenciae.trac_in.factored import FactoredTracInKernels
    if merged_bytes is not None:
        monkeypatch.setattr(memory, "MERGED_BATCH_BYTES", merged_bytes)
    rows, held = [], []
    pairwise, held_test_factors = FactoredTracInKernels.pairwise, FactoredTracInKernels.held_test_factors
    monkeypatch.setattr(FactoredTracInKernels, "pairwise", lambda self, test, train, rates: rows.append(
        int(train[0].shape[0])) or pairwise(self, test, train, rates))
    monkeypatch.setattr(FactoredTracInKernels, "held_test_factors",
                        lambda self, batch: held.append(1) or held_test_factors(self, batch))
    check_two_checkpoint_conv_matrix(12, 1.1, (0.3, 0.5))
    assert rows == [size for size in train_rows for _ in range(3)]  # every training call with the 3 test batches
    assert not held


def time_major_model():
    keras.utils.set_random_seed(10)
    return keras.Sequential([keras.Input((6, 5)), _TimeMajorRows(name="time_major_rows"),
                             keras.layers.Dense(4, activation="tanh"),
                             _BackToSamples(name="back_to_samples"), keras.layers.Dense(3)])


def test_rows_that_are_not_samples_are_caught_by_the_plan():
    """The dense layer on time-major rows is left out of the plan (its weights get per-sample gradients of the
    whole model), the one after it is factored; the values match per-sample tapes."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(4, 6, 5)).astype(np.float32), rng.integers(0, 3, 4)
    model = time_major_model()
    factors = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS).layer_factors
    values = factors((tf.constant(x), tf.constant(y)))
    assert not factors.plan.fully_factored and [plan.layer for plan in factors.plan.factored] == [model.layers[3]]
    assert values.layer_factors_of(model.layers[1].kernel) is None
    assert any("one row per sample" in refusal for refusal in factors.plan.refusals)
    gradients = per_sample_tapes(model, x, y)
    np.testing.assert_allclose(values.gradients().numpy(), gradients, rtol=1e-5, atol=1e-6)
