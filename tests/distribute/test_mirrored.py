"""Every method under a ``MirroredStrategy`` over two logical CPU devices gives the single-device values.

The training set has 21 samples in batches of 5: batches split 3/2 across the replicas, and the last batch (one
sample) leaves the second replica without data. The test set has 7 samples in batches of 3."""
import os
from typing import Callable, Dict

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import (EKFACIHVP, ConjugateGradientDescentIHVP, Executor, GradientProjector,
                                     InfluenceModel, KFACIHVP)
from deel.influenciae.common.distribution import batch_position, replica_bounds, run_on_replicas
from deel.influenciae.influence import (ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator,
                                        SecondOrderInfluenceCalculator)
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE
from deel.influenciae.trac_in import TracIn
from deel.influenciae.trak import TRAK

RELATIVE = 1e-5


@pytest.fixture(scope="module", name="strategy")
def fixture_strategy() -> tf.distribute.Strategy:
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "tests/conftest.py must split the CPU into two logical devices before TF starts"
    return tf.distribute.MirroredStrategy([device.name for device in devices[:2]])


def _problem(seed: int = 0, dtype: str = "float32"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,), dtype=dtype), keras.layers.Dense(5, activation="tanh", dtype=dtype),
                              keras.layers.Dense(3, use_bias=False, dtype=dtype)])
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(21, 6)).astype(dtype)
    labels = np.eye(3, dtype=dtype)[rng.integers(0, 3, 21)]
    train = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(5)
    test = tf.data.Dataset.from_tensor_slices((inputs[:7] + 0.1, labels[:7])).batch(3)
    return model, train, test


LOSS = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")

BUILDERS: Dict[str, Callable] = {
    "exact": lambda im, model, train: FirstOrderInfluenceCalculator(im, train, "exact", regularization=1e-2),
    "relatif": lambda im, model, train: FirstOrderInfluenceCalculator(im, train, "exact", regularization=1e-2,
                                                                      normalize=True),
    "cg": lambda im, model, train: FirstOrderInfluenceCalculator(
        im, train, ConjugateGradientDescentIHVP(im, 0, train, regularization=1e-2, curvature="gauss_newton", tol=1e-9,
                                                atol=0.0)),
    "lissa": lambda im, model, train: FirstOrderInfluenceCalculator(im, train, "lissa", regularization=1.0),
    "arnoldi": lambda im, model, train: ArnoldiInfluenceCalculator(im, train, subspace_dim=10, force_hermitian=True,
                                                                   k_largest_eig_vals=6),
    "tracin": lambda im, model, train: TracIn([im, im], [0.1, 0.2]),
    "tracin_projected": lambda im, model, train: TracIn([im], [0.1], projector=GradientProjector(16, seed=0)),
    "rps_l2": lambda im, model, train: RepresenterPointL2(model, train, LOSS, epochs=5, strategy=im.strategy),
    "rps_lje": lambda im, model, train: RepresenterPointLJE(im, train),
    "kfac_true_fisher": lambda im, model, train: FirstOrderInfluenceCalculator(
        im, train, KFACIHVP(im, train, regularization=1e-2, fisher="true", from_logits=True, seed=3)),
    "ekfac": lambda im, model, train: FirstOrderInfluenceCalculator(im, train, EKFACIHVP(im, train,
                                                                                         regularization=1e-2)),
    "trak": lambda im, model, train: TRAK([im], train, GradientProjector(16, seed=0), regularization=1e-2,
                                          reweight="cross_entropy"),
}


def _assert_close(single: tf.Tensor, distributed: tf.Tensor, what: str) -> None:
    single, distributed = np.asarray(single, np.float64), np.asarray(distributed, np.float64)
    assert single.shape == distributed.shape, what
    scale = max(float(np.max(np.abs(single))), 1e-30)
    assert float(np.max(np.abs(single - distributed))) <= RELATIVE * scale, what


def _pair(strategy: tf.distribute.Strategy, build: Callable):
    model, train, test = _problem()
    calculators = []
    for chosen in (None, strategy):
        influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS, strategy=chosen)
        calculators.append(build(influence_model, model, train))
    return calculators, train, test


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_values_and_top_k_equal_single_device(strategy, method):
    (single, distributed), train, test = _pair(strategy, BUILDERS[method])
    assert single.strategy is None and distributed.strategy is strategy
    _assert_close(single.self_influence(train), distributed.self_influence(train), "self-influence")
    _assert_close(single.influence_matrix(test, train), distributed.influence_matrix(test, train), "matrix")
    expected, found = single.influence_top_k(test, train, k=4), distributed.influence_top_k(test, train, k=4)
    np.testing.assert_array_equal(expected.indices.numpy(), found.indices.numpy())
    _assert_close(expected.values, found.values, "top-k values")
    top = single.self_influence_top_k(train, k=3)
    np.testing.assert_array_equal(top.indices.numpy(), distributed.self_influence_top_k(train, k=3).indices.numpy())


@pytest.mark.parametrize("order", ["first", "second"])
def test_group_influence_equals_single_device(strategy, order):
    """In float64: a group's summed gradients cancel, and float32 summation order alone moves them by ~1e-5."""
    model, train, _ = _problem(dtype="float64")
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")
    values = []
    for chosen in (None, strategy):
        influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss, strategy=chosen)
        if order == "first":
            calculator = FirstOrderInfluenceCalculator(influence_model, train, "exact", regularization=0.1)
        else:
            calculator = SecondOrderInfluenceCalculator(influence_model, train, "exact", regularization=0.1)
        inputs, labels = (tensor[10:20] for tensor in next(iter(train.unbatch().batch(21))))
        evaluated = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(3)  # batches of 3, 3, 3 and 1
        values.append(calculator.estimate_influence_values_group(train.take(2), evaluated))
    assert abs(float(values[0][0, 0])) > 1e-3
    _assert_close(values[0], values[1], "group influence")


def test_index_contents_equal_single_device(strategy, tmp_path):
    (single, distributed), train, test = _pair(strategy, BUILDERS["tracin"])
    first = single.build_index(train, os.fspath(tmp_path / "single"), dtype="float32", shard_size=8)
    second = distributed.build_index(train, os.fspath(tmp_path / "mirrored"), dtype="float32", shard_size=8)
    names = sorted(name for name in os.listdir(tmp_path / "single") if name.endswith(".npy"))
    assert names == sorted(name for name in os.listdir(tmp_path / "mirrored") if name.endswith(".npy"))
    assert len(names) == 3  # 21 rows in shards of 8
    for name in names:
        _assert_close(np.load(tmp_path / "single" / name), np.load(tmp_path / "mirrored" / name), name)
    expected, found = first.top_k(test, 5), second.top_k(test, 5)
    np.testing.assert_array_equal(expected.indices.numpy(), found.indices.numpy())


def test_model_built_in_scope_captures_the_strategy(strategy):
    _, train, test = _problem()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        mirrored = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                                     keras.layers.Dense(3, use_bias=False)])
        influence_model = InfluenceModel(mirrored, start_layer=0, last_layer=-1, loss_function=LOSS)
        calculator = FirstOrderInfluenceCalculator(influence_model, train,
                                                   EKFACIHVP(influence_model, train, regularization=1e-2))
    assert influence_model.strategy is strategy and calculator.strategy is strategy
    plain, _, _ = _problem()
    reference_model = InfluenceModel(plain, start_layer=0, last_layer=-1, loss_function=LOSS)
    assert reference_model.strategy is None
    reference = FirstOrderInfluenceCalculator(reference_model, train,
                                              EKFACIHVP(reference_model, train, regularization=1e-2))
    _assert_close(reference.influence_matrix(test, train), calculator.influence_matrix(test, train), "matrix")


def test_strategy_argument_is_checked():
    model, _, _ = _problem()
    with pytest.raises(TypeError, match="strategy must be a tf.distribute.Strategy"):
        InfluenceModel(model, loss_function=LOSS, strategy="mirrored")


def test_replica_bounds_split_like_mirrored_strategy():
    assert replica_bounds(5, 2) == [(0, 3), (3, 5)]
    assert replica_bounds(1, 2) == [(0, 1), (1, 1)]
    assert replica_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_map_and_sum_of_a_batch_smaller_than_the_replicas(strategy):
    batch = (tf.constant([[1.0, 2.0]]),)
    positions = []

    def rows(part):
        positions.append(tuple(batch_position()))
        return part[0] * 2.0

    mapped = run_on_replicas(strategy, rows, batch, batch_index=4, axis=0)
    np.testing.assert_array_equal(mapped.numpy(), [[2.0, 4.0]])
    assert (4, 0) in positions
    summed = run_on_replicas(strategy, lambda part: tf.reduce_sum(part[0], axis=0), batch, 0, axis=None)
    np.testing.assert_array_equal(summed.numpy(), [1.0, 2.0])  # the empty replica adds zeros, not its stand-in row


def test_executor_passes_match_without_strategy(strategy):
    _, train, _ = _problem()
    plain, split = Executor(), Executor(strategy=strategy)
    total, count = split.sum(lambda batch: tf.reduce_sum(batch[0], axis=0), train)
    expected, expected_count = plain.sum(lambda batch: tf.reduce_sum(batch[0], axis=0), train)
    assert count == expected_count == 21
    _assert_close(expected, total, "sum")
    np.testing.assert_array_equal(split.concat(lambda batch: batch[0] * 3.0, train).numpy(),
                                  plain.concat(lambda batch: batch[0] * 3.0, train).numpy())
    outer = split.concat(lambda batch: tf.transpose(batch[0]), train, axis=1)
    np.testing.assert_array_equal(outer.numpy(), plain.gather(train)[0].numpy().T)
