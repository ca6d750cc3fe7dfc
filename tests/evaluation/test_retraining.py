"""The retraining driver: subsets in order, seeding, on-disk cache and resume after an interruption."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.evaluation import (leave_one_out_masks, linear_datamodeling_score, random_subset_masks,
                                         retrain_outputs)

N, T, D, RIDGE = 24, 5, 3, 0.1


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N + T, D)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + rng.normal(scale=0.3, size=N + T)).astype(np.float32)
    return x[:N], y[:N], x[N:], y[N:]


class RidgeTrainer:
    """Closed-form ridge regression loaded into a Keras Dense(1); a jitter drawn from NumPy's *global* generator
    checks that the driver seeds it; ``fail_after`` simulates a run killed after that many trainings."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.subsets = 0, fail_after, []
        self.model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])

    def __call__(self, subset, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        features, targets = (np.stack(part) for part in zip(*subset.as_numpy_iterator()))
        self.subsets.append(features)
        gram = features.T.astype(np.float64) @ features + RIDGE * np.eye(D)
        weights = np.linalg.solve(gram, features.T @ targets) + 1e-3 * np.random.normal(size=D)
        self.model.set_weights([weights.reshape(D, 1).astype(np.float32)])
        return self.model


def measure(model):
    _, _, x_test, y_test = problem()
    return -np.square(model(x_test).numpy()[:, 0] - y_test)


def train_set():
    x, y, _, _ = problem()
    return tf.data.Dataset.from_tensor_slices((x, y))


def test_outputs_follow_the_masks_and_seeds():
    masks = random_subset_masks(N, 4, seed=1)
    trainer = RidgeTrainer()
    outputs = retrain_outputs(trainer, train_set(), masks, measure, seeds=(3, 4), verbose=False)
    assert outputs.shape == (2, 4, T)
    x, _, _, _ = problem()
    for index, features in enumerate(trainer.subsets[:4]):  # seed 3: the subsets in order, samples in order
        np.testing.assert_array_equal(features, x[masks[index]])
    assert not np.array_equal(outputs[0], outputs[1])  # the seed reaches the global generator
    again = retrain_outputs(RidgeTrainer(), train_set(), masks, measure, seeds=(3, 4), verbose=False)
    np.testing.assert_array_equal(outputs, again)


def test_resume_after_a_kill_gives_the_same_outputs_bit_for_bit(tmp_path):
    masks = random_subset_masks(N, 6, seed=2)
    reference = retrain_outputs(RidgeTrainer(), train_set(), masks, measure, seeds=(0, 1), verbose=False)
    killed = RidgeTrainer(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        retrain_outputs(killed, train_set(), masks, measure, seeds=(0, 1), cache_dir=tmp_path, verbose=False)
    assert len(list(tmp_path.glob("subset_*.npy"))) == 4
    resumed_trainer = RidgeTrainer()
    resumed = retrain_outputs(resumed_trainer, train_set(), masks, measure, seeds=(0, 1), cache_dir=tmp_path,
                              verbose=False)
    assert resumed_trainer.calls == 12 - 4  # only what the killed run had not written
    np.testing.assert_array_equal(resumed, reference)
    cached_trainer = RidgeTrainer()
    np.testing.assert_array_equal(retrain_outputs(cached_trainer, train_set(), masks, measure, seeds=(0, 1),
                                                  cache_dir=tmp_path, verbose=False), reference)
    assert cached_trainer.calls == 0
    with pytest.raises(ValueError, match="other subsets"):
        retrain_outputs(RidgeTrainer(), train_set(), random_subset_masks(N, 6, seed=3), measure, cache_dir=tmp_path,
                        verbose=False)


def test_input_errors():
    masks = random_subset_masks(N, 3, seed=0)
    with pytest.raises(ValueError, match="unbatched"):
        retrain_outputs(RidgeTrainer(), train_set().batch(4), masks, measure, verbose=False)
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        retrain_outputs(RidgeTrainer(), problem()[0], masks, measure, verbose=False)
    with pytest.raises(ValueError, match="seeds"):
        retrain_outputs(RidgeTrainer(), train_set(), masks, measure, seeds=(), verbose=False)
    with pytest.raises(ValueError, match="non-finite"):
        retrain_outputs(RidgeTrainer(), train_set(), masks, lambda model: [np.nan], verbose=False)


def test_lds_of_exact_ridge_influence_is_high():
    """On ridge regression the influence g_tᵀ (H + λI/N)⁻¹ g_i predicts retraining well (LDS near 1)."""
    x, y, x_test, y_test = (part.astype(np.float64) for part in problem())
    weights = np.linalg.solve(x.T @ x + RIDGE * np.eye(D), x.T @ y)
    hessian = 2.0 * (x.T @ x + RIDGE * np.eye(D)) / N
    train_grads = 2.0 * (x @ weights - y)[:, None] * x
    test_grads = 2.0 * (x_test @ weights - y_test)[:, None] * x_test
    scores = test_grads @ np.linalg.solve(hessian, train_grads.T)
    masks = random_subset_masks(N, 40, seed=4)
    outputs = retrain_outputs(RidgeTrainer(), train_set(), masks, measure, seeds=(0,), verbose=False).mean(axis=0)
    assert linear_datamodeling_score(scores, masks, outputs).score > 0.6
    assert linear_datamodeling_score(-scores, masks, outputs).score < -0.6
    loo = retrain_outputs(RidgeTrainer(), train_set(), leave_one_out_masks(N, [0, 1, 2]), measure, verbose=False)
    assert loo.shape == (1, 4, T)


def test_subset_dataset_knows_its_size():
    """Keras' fit sees how many samples a subset has (no 'ran out of data' guess)."""
    sizes = []
    masks = random_subset_masks(N, 3, fraction=0.25, seed=5)
    retrain_outputs(lambda subset, seed: sizes.append(int(subset.cardinality())) or RidgeTrainer()(subset, seed),
                    train_set(), masks, measure, verbose=False)
    assert sizes == [6, 6, 6]
