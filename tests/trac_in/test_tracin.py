"""TracIn and ModelsSaver against closed-form per-checkpoint gradients of the toy model (float64 numpy)."""
import keras
import numpy as np
import pytest

from deel.influenciae.common import InfluenceModel
from deel.influenciae.trac_in import ModelsSaver, TracIn
from deel.influenciae.utils import ORDER
from tests.assertions import assert_close_to_max
from tests.toy_models import (toy_data, toy_dataset, toy_gradients_all_layers, toy_gradients_last_layer, toy_model,
                              toy_mse)

LEARNING_RATES = (0.1, 0.3)


@pytest.fixture(name="setup", scope="module")
def fixture_setup():
    first, second = toy_model(seed=0), toy_model(seed=3)
    x_train, y_train = toy_data(n=25, seed=1)
    x_test, y_test = toy_data(n=12, seed=2)
    # The checkpoints watch different layers: the last layer (P=2) and both layers (P=8).
    models = [InfluenceModel(first, start_layer=-1, loss_function=toy_mse()),
              InfluenceModel(second, start_layer=0, last_layer=1, loss_function=toy_mse())]

    def scaled(x, y):
        return np.concatenate([np.sqrt(LEARNING_RATES[0]) * toy_gradients_last_layer(first, x, y),
                               np.sqrt(LEARNING_RATES[1]) * toy_gradients_all_layers(second, x, y)], axis=1)

    v_train, v_test = scaled(x_train, y_train), scaled(x_test, y_test)
    g1_train, g1_test = toy_gradients_last_layer(first, x_train, y_train), toy_gradients_last_layer(first, x_test,
                                                                                                   y_test)
    g2_train, g2_test = toy_gradients_all_layers(second, x_train, y_train), toy_gradients_all_layers(second, x_test,
                                                                                                    y_test)
    pairwise = LEARNING_RATES[0] * g1_test @ g1_train.T + LEARNING_RATES[1] * g2_test @ g2_train.T
    return {"calculator": TracIn(models, list(LEARNING_RATES)), "models": models, "vectors": v_train,
            "pairwise": pairwise, "self": (LEARNING_RATES[0] * (g1_train ** 2).sum(1)
                                           + LEARNING_RATES[1] * (g2_train ** 2).sum(1)),
            "train": toy_dataset(x_train, y_train, 5), "test": toy_dataset(x_test, y_test, 5),
            "x_train": x_train, "test_vectors": v_test}


def _close(actual, expected, tolerance=1e-5):
    assert_close_to_max(actual, expected, tolerance)


def test_influence_vectors_are_scaled_gradients(setup):
    calculator = setup["calculator"]
    assert calculator.nb_params == 10
    vectors = [v.numpy() for _, v in calculator.compute_influence_vector(setup["train"])]
    assert [v.shape for v in vectors] == [(5, 10)] * 5
    _close(np.concatenate(vectors), setup["vectors"])
    first_test = next(iter(setup["test"]))
    _close(calculator._preprocess_samples(tuple(first_test)), setup["test_vectors"][:5])  # pylint: disable=W0212


def test_values_equal_the_sum_over_checkpoints(setup):
    calculator = setup["calculator"]
    _close(calculator.estimate_influence_values_matrix(setup["test"], setup["train"]), setup["pairwise"])
    rows = []
    for (x_test, _), inner in calculator.estimate_influence_values_in_batches(setup["test"], setup["train"]):
        blocks = [values.numpy() for _, values in inner]
        assert [b.shape for b in blocks] == [(len(x_test), 5)] * 5
        rows.append(np.concatenate(blocks, axis=1))
    _close(np.concatenate(rows), setup["pairwise"])
    first_train, first_test = next(iter(setup["train"])), next(iter(setup["test"]))
    _close(calculator.checkpoint_values(first_test, first_train), setup["pairwise"][:5, :5])
    models = setup["models"]
    g_test = toy_gradients_last_layer(models[0].model, first_test[0].numpy(), first_test[1].numpy())
    g_train = toy_gradients_last_layer(models[0].model, first_train[0].numpy(), first_train[1].numpy())
    _close(calculator.checkpoint_values(first_test, first_train, 0), LEARNING_RATES[0] * g_test @ g_train.T)


def test_self_influence_and_top_k(setup):
    calculator = setup["calculator"]
    per_batch = [values.numpy() for _, values in calculator.compute_influence_values(setup["train"])]
    assert [v.shape for v in per_batch] == [(5, 1)] * 5
    _close(calculator._compute_influence_values(setup["train"])[:, 0], setup["self"])  # pylint: disable=W0212
    _, values, indices = calculator.compute_top_k_from_training_dataset(setup["train"], 3, return_indices=True)
    np.testing.assert_array_equal(indices.numpy(), np.argsort(-setup["self"], kind="stable")[:3])
    expected = np.argsort(setup["pairwise"], axis=1, kind="stable")[:, :2]
    found = [idx.numpy() for _, _, _, idx in calculator.top_k(setup["test"], setup["train"], k=2,
                                                              order=ORDER.ASCENDING, return_indices=True)]
    np.testing.assert_array_equal(np.concatenate(found), expected)
    _close(values.numpy(), np.sort(setup["self"])[::-1][:3])


def test_learning_rate_broadcast_and_errors(setup):
    models = setup["models"]
    assert TracIn(models, 0.2).learning_rates == (0.2, 0.2)
    assert TracIn(models, (0.1, 0.3)).learning_rates == LEARNING_RATES
    assert TracIn(models[0], 0.5).learning_rates == (0.5,)
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        TracIn(models, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        TracIn(models, (0.1,))
    with pytest.raises(ValueError, match=">= 0"):
        TracIn(models, -1.0)
    with pytest.raises(TypeError, match="learning_rates"):
        TracIn(models, "0.1")
    with pytest.raises(ValueError, match="at least one"):
        TracIn([], 0.1)
    with pytest.raises(TypeError, match="InfluenceModel"):
        TracIn([models[0].model], 0.1)
    float64 = InfluenceModel(toy_model(dtype="float64"), start_layer=-1, loss_function=toy_mse("float64"))
    with pytest.raises(ValueError, match="dtype"):
        TracIn([models[0], float64], 0.1)
    unbatched = setup["train"].unbatch()
    with pytest.raises(ValueError, match="batched"):
        setup["calculator"].compute_influence_values(unbatched)
    with pytest.raises(ValueError, match="batched"):
        setup["calculator"].estimate_influence_values_in_batches(setup["test"], unbatched)
    with pytest.raises(ValueError, match="train_set"):
        setup["calculator"].estimate_influence_values_matrix(setup["test"], unbatched)
    with pytest.raises(ValueError, match="dataset_to_evaluate is empty"):
        setup["calculator"].estimate_influence_values_matrix(setup["test"].take(0), setup["train"])


def _last_layer_gradients(model, x, y):
    """Closed-form gradients w.r.t. the last kernel for a Sequential or Functional toy model: (n, 2)."""
    w1, w2 = [layer.kernel.numpy().astype(np.float64) for layer in model.layers if layer.weights]
    hidden = x[:, 0, :].astype(np.float64) @ w1
    return 2.0 * (hidden @ w2 - y[:, 0, :].astype(np.float64)) * hidden


def _functional_toy(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((1, 3))
    hidden = keras.layers.Dense(2, use_bias=False)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, use_bias=False)(hidden))


@pytest.mark.parametrize("functional", [False, True])
def test_models_saver_checkpoints_reproduce_values(tmp_path, functional):
    model = _functional_toy(4) if functional else toy_model(seed=4)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=5, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x_train, y_train = toy_data(n=25, seed=1)
    x_test, y_test = toy_data(n=6, seed=2)
    saved_weights = {}
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: saved_weights.__setitem__(epoch, model.layers[-1].kernel.numpy().copy()))
    saver = ModelsSaver([0, 2], saving_path=str(tmp_path / "ckpt"))
    model.fit(x_train, y_train, batch_size=5, epochs=3, shuffle=False, verbose=0, callbacks=[record, saver])
    assert saver.epochs == [0, 2] and len(saver.models) == 2
    # Decay is continuous in the step count: 5 steps per epoch.
    np.testing.assert_allclose(saver.learning_rates, [0.05 * 0.5 ** 1, 0.05 * 0.5 ** 3], rtol=1e-6)
    for checkpoint, epoch in zip(saver.models, (0, 2)):
        np.testing.assert_array_equal(checkpoint.layers[-1].kernel.numpy(), saved_weights[epoch])
        assert checkpoint is not model
    final = model.layers[-1].kernel.numpy().copy()
    train, test = toy_dataset(x_train, y_train, 5), toy_dataset(x_test, y_test, 4)
    expected = sum(rate * _last_layer_gradients(ckpt, x_test, y_test) @ _last_layer_gradients(ckpt, x_train, y_train).T
                   for ckpt, rate in zip(saver.models, saver.learning_rates))
    for source in (saver, ModelsSaver.load(str(tmp_path / "ckpt"))):
        tracin = TracIn.from_models_saver(source, toy_mse(), start_layer=-1)
        _close(tracin.estimate_influence_values_matrix(test, train), expected)
    models, rates = ModelsSaver.load_checkpoints(str(tmp_path / "ckpt"))
    assert len(models) == 2 and rates == saver.learning_rates
    np.testing.assert_array_equal(model.layers[-1].kernel.numpy(), final)  # the trained model is untouched


def test_models_saver_disk_only_and_errors(tmp_path):
    model = toy_model(seed=5)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x_train, y_train = toy_data(n=10, seed=1)
    saver = ModelsSaver([1], saving_path=str(tmp_path / "disk"), keep_in_memory=False)
    model.fit(x_train, y_train, batch_size=5, epochs=2, verbose=0, callbacks=[saver])
    models, rates = saver.checkpoints()
    assert saver.models == [] and len(models) == 1 and rates == pytest.approx([0.01])
    np.testing.assert_array_equal(models[0].layers[-1].kernel.numpy(), model.layers[-1].kernel.numpy())
    with pytest.raises(ValueError, match="No checkpoint"):
        ModelsSaver([7]).checkpoints()
    with pytest.raises(ValueError, match="epochs_to_save"):
        ModelsSaver([])
    with pytest.raises(ValueError, match="saving_path"):
        ModelsSaver([1], keep_in_memory=False)
    with pytest.raises(FileNotFoundError):
        ModelsSaver.load_checkpoints(str(tmp_path / "nothing"))
