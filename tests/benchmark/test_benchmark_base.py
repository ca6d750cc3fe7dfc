"""Mislabeled-sample detection: noise injection, detection curve, saving, factories, data loaders."""
import os
import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.benchmark import (ArnoldiCalculatorFactory, BaseTrainingProcedure,
                                        Cifar10MislabelingDetectorEvaluator, DigitsTrainingProcedure,
                                        FirstOrderFactory, LossRankingFactory, MislabelingDetectorEvaluator,
                                        RPSL2Factory, RPSLJEFactory, SampleBoundaryCalculatorFactory, TracInFactory,
                                        WeightsBoundaryCalculatorFactory, load_cifar10, load_digits_datasets)
from deel.influenciae.benchmark.influence_factory import hessian_subset
from deel.influenciae.common import (ArnoldiIHVP, ConjugateGradientConfig, ConjugateGradientDescentIHVP,
                                     SelfInfluenceCalculator)
from deel.influenciae.plots import BenchmarkDisplay

NB_CLASSES = 10


def class_dataset(nb_samples: int, seed: int = 0) -> tf.data.Dataset:
    """Unbatched ``(x, one_hot_y)`` where ``x`` holds the true class as a float (lets an oracle see the noise)."""
    classes = np.random.default_rng(seed).integers(0, NB_CLASSES, nb_samples)
    return tf.data.Dataset.from_tensor_slices((classes.astype(np.float32)[:, None],
                                               np.eye(NB_CLASSES, dtype=np.float32)[classes]))


class NoTraining(BaseTrainingProcedure):
    """Returns a fixed model without training (the oracle below does not use it)."""

    def train(self, training_dataset, test_dataset, train_batch_size=128, test_batch_size=128, log_path=None):
        return 1.0, 1.0, keras.Sequential([keras.Input((1,)), keras.layers.Dense(NB_CLASSES)]), None


class OracleCalculator(SelfInfluenceCalculator):
    """Scores 1 for a mislabeled sample (its label differs from the true class stored in x), else 0."""

    def _compute_influence_value_from_batch(self, train_samples):
        true_class = tf.cast(train_samples[0][:, 0], tf.int64)
        return tf.cast(tf.argmax(train_samples[1], axis=1) != true_class, tf.float32)[:, None]


class OracleFactory:
    """Factory of :class:`OracleCalculator`."""

    def build(self, training_dataset, model, train_info):  # pylint: disable=unused-argument
        return OracleCalculator()


def evaluator(nb_samples: int, ratio: float = 0.1) -> MislabelingDetectorEvaluator:
    return MislabelingDetectorEvaluator(class_dataset(nb_samples), class_dataset(10, 1), NoTraining(), NB_CLASSES,
                                        ratio, influence_batch_size=64)


def noisy_arrays(dataset: tf.data.Dataset):
    x, y = next(iter(dataset.batch(100_000)))
    return x.numpy()[:, 0].astype(np.int64), np.argmax(y.numpy(), axis=1)


def test_noise_ratio_and_labels_always_changed():
    bench = evaluator(10_000, 0.1)
    noisy, noise_indexes = bench.build_noisy_training_dataset(seed=3)
    assert abs(len(noise_indexes) / 10_000 - 0.1) < 0.01  # within 10 % relative
    true_class, noisy_class = noisy_arrays(noisy)
    changed = np.flatnonzero(true_class != noisy_class)
    np.testing.assert_array_equal(changed, noise_indexes)  # every noisy label differs, the others are kept
    # The new classes cover the other classes (drawn uniformly among them).
    assert len(np.unique(noisy_class[noise_indexes])) == NB_CLASSES


def test_noise_is_reproducible_and_fixed_at_iteration():
    bench = evaluator(2_000, 0.2)
    noisy_a, indexes_a = bench.build_noisy_training_dataset(seed=5)
    noisy_b, indexes_b = bench.build_noisy_training_dataset(seed=5)
    _, indexes_c = bench.build_noisy_training_dataset(seed=6)
    np.testing.assert_array_equal(indexes_a, indexes_b)
    assert not np.array_equal(indexes_a, indexes_c)
    np.testing.assert_array_equal(noisy_arrays(noisy_a)[1], noisy_arrays(noisy_b)[1])
    np.testing.assert_array_equal(noisy_arrays(noisy_a)[1], noisy_arrays(noisy_a)[1])  # same at every pass
    with pytest.raises(ValueError):
        evaluator(10, 1.0)


def test_detection_curve_worked_example():
    # SPEC §5: ranking [2, 6, 3, 4, 5, 1, 7, 8, 9, 10] (1-based sample numbers), mislabeled samples {6, 8}.
    ranking = np.array([2, 6, 3, 4, 5, 1, 7, 8, 9, 10]) - 1
    values = np.empty(10)
    values[ranking] = np.arange(10, 0, -1)  # descending self-influence in ranking order
    curve = MislabelingDetectorEvaluator.compute_detection_curve(values[:, None], np.array([6, 8]) - 1)
    np.testing.assert_allclose(curve, [0, .5, .5, .5, .5, .5, .5, 1, 1, 1], atol=1e-6)
    assert MislabelingDetectorEvaluator._compute_roc(curve) == pytest.approx(0.6)  # pylint: disable=protected-access


def test_evaluate_and_bench_save_load_round_trip(tmp_path):
    bench = evaluator(300, 0.1)
    result = bench.bench({"oracle": OracleFactory()}, nbr_of_evaluation=2, path_to_save=str(tmp_path), seed=4,
                         verbose=False)
    curves, mean_curve, roc = result["oracle"]
    assert curves.shape == (2, 300) and mean_curve.shape == (300,)
    # The oracle ranks every mislabeled sample first: the curve reaches 1 after M samples.
    for curve, seed in zip(curves, (4, 5)):
        nb_noisy = len(bench.build_noisy_training_dataset(seed)[1])
        assert curve[nb_noisy - 1] == pytest.approx(1.0)
    assert roc > 0.9
    assert len(bench.timings["oracle"]["influence_seconds"]) == 2
    loaded = BenchmarkDisplay.load_bench_result(str(tmp_path))
    np.testing.assert_allclose(loaded["oracle"][0], curves, atol=1e-6)
    np.testing.assert_allclose(loaded["oracle"][1], mean_curve, atol=1e-6)
    assert loaded["oracle"][2] == pytest.approx(roc)
    assert os.path.exists(os.path.join(tmp_path, "oracle_config.json"))


def test_hessian_subset_counts_samples():
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(10.0)[:, None], np.arange(10.0))).batch(4)
    subset = hessian_subset(dataset, 5)
    assert [int(batch[0].shape[0]) for batch in subset] == [4, 1]
    assert sum(int(batch[0].shape[0]) for batch in hessian_subset(dataset, -1)) == 10


# Factories on a tiny trained digits model ----------------------------------------------------------

@pytest.fixture(name="trained", scope="module")
def fixture_trained():
    keras.utils.set_random_seed(0)
    train, test = load_digits_datasets(train_size=96, test_size=32)
    procedure = DigitsTrainingProcedure(epochs=4, hidden_units=16, epochs_to_save=[1, 3])
    train_acc, test_acc, model, train_info = procedure.train(train, test, train_batch_size=32)
    assert 0 <= train_acc <= 1 and 0 <= test_acc <= 1
    assert len(train_info[0]) == 2 and len(train_info[1]) == 2
    return train.batch(32), model, train_info


FACTORIES = {
    "first_order_exact": lambda: FirstOrderFactory("exact", regularization=1e-3),
    "first_order_cgd": lambda: FirstOrderFactory("cgd", n_opt_iters=10, dataset_hessian_size=64,
                                                 regularization=1e-2),
    "first_order_lissa": lambda: FirstOrderFactory("lissa", n_opt_iters=10),
    "first_order_arnoldi": lambda: FirstOrderFactory("arnoldi", regularization=1e-3, dataset_hessian_size=64),
    "first_order_config": lambda: FirstOrderFactory(ConjugateGradientConfig(regularization=1e-2, n_opt_iters=10)),
    "arnoldi": lambda: ArnoldiCalculatorFactory(subspace_dim=20, force_hermitian=True, k_largest_eig_vals=10,
                                                dataset_hessian_size=64),
    "tracin": TracInFactory,
    "rps_l2": lambda: RPSL2Factory(epochs=10),
    "rps_lje": lambda: RPSLJEFactory(dataset_hessian_size=64),
    "rps_lje_arnoldi": lambda: RPSLJEFactory("arnoldi", dataset_hessian_size=64, regularization=1e-3),
    "boundary_weights": lambda: WeightsBoundaryCalculatorFactory(step_nbr=3),
    "boundary_sample": lambda: SampleBoundaryCalculatorFactory(step_nbr=3),
    "loss_ranking": LossRankingFactory,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_builds_working_calculator(trained, name):
    dataset, model, train_info = trained
    calculator = FACTORIES[name]().build(dataset, model, train_info)
    values = calculator._compute_influence_values(dataset).numpy()  # pylint: disable=protected-access
    assert values.shape == (96, 1)
    assert np.all(np.isfinite(values))


def test_factories_build_the_registered_solver(trained):
    dataset, model, train_info = trained
    calculator = FirstOrderFactory("arnoldi", regularization=1e-3).build(dataset, model, train_info)
    assert isinstance(calculator.ihvp_calculator, ArnoldiIHVP)
    config = ConjugateGradientConfig(regularization=1e-2, n_opt_iters=10)
    factory = FirstOrderFactory(config, regularization=5.0)  # a configuration keeps its own settings
    assert factory.ihvp_mode == "cgd" and factory.solver_config() is config
    calculator = factory.build(dataset, model, train_info)
    assert isinstance(calculator.ihvp_calculator, ConjugateGradientDescentIHVP)
    assert calculator.ihvp_calculator.regularization == pytest.approx(1e-2)


def test_tracin_factory_needs_checkpoints(trained):
    dataset, model, _ = trained
    with pytest.raises(ValueError, match="checkpoints"):
        TracInFactory().build(dataset, model, None)
    with pytest.raises(ValueError, match="ihvp_mode"):
        FirstOrderFactory("newton")


# Data loaders ---------------------------------------------------------------------------------

def test_load_digits_datasets_shapes():
    train, test = load_digits_datasets(train_size=50, test_size=20, image=True)
    x, y = next(iter(train.batch(100)))
    assert x.shape == (50, 8, 8, 1) and y.shape == (50, 10)
    assert float(tf.reduce_max(x)) <= 1.0 and np.allclose(y.numpy().sum(axis=1), 1.0)
    assert int(test.cardinality()) == 20


def test_cifar10_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_download"):
        load_cifar10(data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        Cifar10MislabelingDetectorEvaluator(epochs=1, data_path=str(tmp_path))


def test_cifar10_reads_the_python_version_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]:
        content = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
    (x_train, y_train), (x_test, y_test) = load_cifar10(data_path=str(tmp_path))
    assert x_train.shape == (10, 32, 32, 3) and y_train.tolist() == [1, 7] * 5
    assert x_test.shape == (2, 32, 32, 3) and y_test.tolist() == [1, 7]
    bench = Cifar10MislabelingDetectorEvaluator(epochs=1, mislabeling_ratio=0.5, data_path=str(folder))
    x, y = next(iter(bench.training_dataset.batch(10)))
    assert x.shape == (10, 32, 32, 3) and -1.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    assert y.shape == (10, 10)
