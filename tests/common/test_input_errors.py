"""Bad input fails early with a clear error naming the argument, what was expected and what was received (DESIGN §5).

Tiny seeded models; every NaN case must raise before any value is returned.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel, LissaIHVP
from deel.influenciae.common.base_influence import CACHE
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.rps import RepresenterPointL2
from deel.influenciae.trac_in import TracIn

N_FEATURES, N_CLASSES = 8, 3
CCE = keras.losses.CategoricalCrossentropy(reduction=None)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(6, activation="relu"),
                             keras.layers.Dense(N_CLASSES, activation="softmax")])


def _data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, n)]
    return x, y


def _dataset(*arrays, batch_size=5):
    return tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(batch_size)


def _with_nan(array, row=7, column=2):
    array = array.copy()
    array[row, column] = np.nan
    return array


@pytest.fixture(name="calculator")
def _calculator():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)
    return FirstOrderInfluenceCalculator(model, _dataset(x, y), ExactIHVP(model, _dataset(x, y), regularization=0.1))


# Non-finite inputs ------------------------------------------------------------------------------------------
def test_nan_training_input_exact_hessian_names_dataset_and_batch():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)  # relu hidden layer: relu(NaN) = 0 in graphs
    with pytest.raises(ValueError, match=r"inputs \(element 0\) of batch 1 of train_dataset, sample 7"):
        ExactIHVP(model, _dataset(_with_nan(x), y))


def test_inf_sample_weight_and_nan_float_target_are_named():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)
    weights = np.ones(len(x), np.float32)
    weights[13] = np.inf
    with pytest.raises(ValueError, match=r"sample weights \(element 2\) of batch 2 of train_dataset, sample 13"):
        ExactIHVP(model, _dataset(x, y, weights))
    with pytest.raises(ValueError, match=r"targets \(element 1\) of batch 0 of train_dataset, sample 3"):
        ExactIHVP(model, _dataset(x, _with_nan(y, 3, 0)))


def test_nan_batch_given_directly_to_a_kernel_entry():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)
    with pytest.raises(ValueError, match=r"inputs \(element 0\) of the batch, sample 7 of the batch"):
        model.batch_jacobian_tensor((tf.constant(_with_nan(x)), tf.constant(y)))


def test_nan_test_inputs_estimate_in_batches_raises_before_returning(calculator):
    x, y = _data(seed=1)
    with pytest.raises(ValueError, match="batch 1 of dataset_to_evaluate, sample 7 of dataset_to_evaluate"):
        calculator.estimate_influence_values_in_batches(_dataset(_with_nan(x), y), _dataset(*_data()))


@pytest.mark.parametrize("cache", [CACHE.MEMORY, CACHE.NO_CACHE])
def test_nan_test_inputs_top_k_raises_before_returning(calculator, cache):
    x, y = _data(seed=1)
    with pytest.raises(ValueError, match="batch 1 of dataset_to_evaluate"):
        calculator.top_k(_dataset(_with_nan(x), y), _dataset(*_data()), k=3, influence_vector_in_cache=cache)


def test_nan_training_inputs_self_influence_top_k(calculator):
    x, y = _data()
    with pytest.raises(ValueError, match="batch 1 of train_set, sample 7 of train_set"):
        calculator.compute_top_k_from_training_dataset(_dataset(_with_nan(x), y), 3)


def test_tracin_non_finite_weights_name_the_checkpoint():
    x, y = _data()
    broken = _mlp(1)
    broken.layers[-1].kernel.assign(np.full((6, N_CLASSES), np.nan, np.float32))
    models = [InfluenceModel(_mlp(0), -1, loss_function=CCE), InfluenceModel(broken, -1, loss_function=CCE)]
    with pytest.raises(ValueError, match=r"Checkpoint 1 \(models\[1\]\) has non-finite .* watched weights"):
        TracIn(models, 0.1)
    # Weights that turn NaN after construction: the top-k says so instead of blaming k.
    later = _mlp(2)
    tracin = TracIn([InfluenceModel(_mlp(0), -1, loss_function=CCE), InfluenceModel(later, -1, loss_function=CCE)],
                    [0.1, 0.2])
    later.layers[-1].bias.assign(np.full((N_CLASSES,), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"Checkpoint 1 \(models\[1\]\)"):
        tracin.compute_top_k_from_training_dataset(_dataset(x, y), 3)


# Shapes ------------------------------------------------------------------------------------------------------
def test_test_set_with_missing_feature_names_dataset_and_shapes(calculator):
    x, y = _data(seed=1)
    wrong = _dataset(x[:, :-1], y)
    message = r"inputs of batch 0 of dataset_to_evaluate have shape \(5, 7\) but the model expects \(None, 8\)"
    with pytest.raises(ValueError, match=message):
        calculator.estimate_influence_values_matrix(wrong, _dataset(*_data()))
    with pytest.raises(ValueError, match=message):
        calculator.estimate_influence_values_in_batches(wrong, _dataset(*_data()))
    with pytest.raises(ValueError, match=message):
        list(calculator.top_k(wrong, _dataset(*_data()), k=3))


def test_test_set_of_wrong_rank_names_dataset_and_shapes(calculator):
    x, y = _data(seed=1)
    with pytest.raises(ValueError, match=r"dataset_to_evaluate have shape \(5, 1, 8\) but the model expects "
                                         r"\(None, 8\)"):
        calculator.estimate_influence_values_matrix(_dataset(x[:, None, :], y), _dataset(*_data()))


# Models and solvers ------------------------------------------------------------------------------------------
def test_unbuilt_model_says_it_is_not_built():
    unbuilt = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(N_CLASSES)])
    with pytest.raises(ValueError, match="is not built"):
        InfluenceModel(unbuilt, 0, loss_function=CCE)


def test_lissa_divergence_names_scale_and_suggests_one():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)  # convex in the last layer: H is PSD
    vectors = tf.ones((model.nb_params, 2))
    with pytest.raises(ValueError, match=r"scale=0.01 must exceed the largest eigenvalue .* e\.g\. scale=") as info:
        LissaIHVP(model, train_dataset=_dataset(x, y), scale=1e-2, n_opt_iters=50).apply_inverse(vectors)
    suggested = float(str(info.value).rsplit("scale=", 1)[1].rstrip("."))
    lissa = LissaIHVP(model, train_dataset=_dataset(x, y), scale=suggested, n_opt_iters=50)
    assert np.isfinite(lissa.apply_inverse(vectors).numpy()).all()


def test_lissa_on_an_indefinite_hessian_asks_for_regularization():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=0, last_layer=-1, loss_function=CCE)
    with pytest.raises(ValueError, match="negative eigenvalue .* Raise regularization"):
        LissaIHVP(model, train_dataset=_dataset(x, y), scale=1e-3, n_opt_iters=50).apply_inverse(
            tf.ones((model.nb_params, 1)))


def test_numpy_integers_are_accepted(calculator):
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=np.int64(0), last_layer=np.int32(-1), loss_function=CCE)
    assert model.start_layer_index == 0 and model.last_layer_index == 1
    LissaIHVP(model, train_dataset=_dataset(x, y), n_opt_iters=np.int64(3), hvp_batch_size=np.int64(10))
    samples, values = calculator.compute_top_k_from_training_dataset(_dataset(x, y), np.int64(4))
    assert samples.shape[0] == values.shape[0] == 4
    batches = list(calculator.top_k(_dataset(*_data(seed=1)), _dataset(x, y), k=np.int64(5)))
    assert tuple(batches[0][1].shape) == (5, 5)


def test_reference_attributes():
    x, y = _data()
    model = InfluenceModel(_mlp(), start_layer=-1, loss_function=CCE)
    for solver in (ConjugateGradientDescentIHVP(model, train_dataset=_dataset(x, y)),
                   LissaIHVP(model, train_dataset=_dataset(x, y))):
        assert [id(w) for w in solver.weights] == [id(w) for w in model.weights]
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(4, activation="tanh"),
                                   keras.layers.Dense(N_CLASSES, use_bias=False)])
    rps = RepresenterPointL2(classifier, _dataset(x, y), keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=None), epochs=5, newton_iterations=2)
    assert rps.linear_layer is rps.surrogate.layers[-1]
    np.testing.assert_array_equal(rps.linear_layer.kernel.numpy(), rps.kernel.numpy())


def test_numpy_batches_are_checked_like_tensors():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    influence_model = InfluenceModel(model, start_layer=0, loss_function=keras.losses.MeanSquaredError(reduction=None))
    gradients = influence_model.batch_jacobian_tensor((np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)))
    assert tuple(gradients.shape) == (4, 8)
    with pytest.raises(ValueError, match=r"shape \(4, 5\) but the model expects \(None, 3\)"):
        influence_model.batch_jacobian_tensor((np.ones((4, 5), np.float32), np.ones((4, 2), np.float32)))
