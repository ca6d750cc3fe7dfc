"""First-order influence against actual leave-one-out retraining on a convex model.

Softmax regression on scikit-learn's bundled wine data, trained to its optimum with L-BFGS (scipy) on
``J(θ) = 1/n Σ_i CE_i(θ) + λ/2 ||θ||²``. Removing z and retraining on ``1/n Σ_{i≠z} CE_i + λ/2 ||θ||²`` changes
the total test loss by ``≈ 1/n Σ_t g(t)ᵀ (H + λI)⁻¹ g(z) = 1/n Σ_t I(t, z)``, with H the mean Hessian of CE: exactly
what ``FirstOrderInfluenceCalculator(..., regularization=λ)`` computes.
"""
import keras
import numpy as np
import tensorflow as tf
from scipy.stats import pearsonr
from sklearn.datasets import load_wine

from deel.influenciae.common import InfluenceModel
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from tests.convex_models import fit_softmax_regression, softmax_losses_and_residuals

LAMBDA = 0.01


def test_first_order_influence_predicts_leave_one_out_retraining():
    data = load_wine()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    x = data.data[order]
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = np.eye(3)[data.target[order]]
    x_train, y_train, x_test, y_test = x[:130], y[:130], x[130:], y[130:]
    n, features = x_train.shape
    theta_star = fit_softmax_regression(x_train, y_train, np.ones(n), np.zeros(features * 3 + 3), LAMBDA)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((features,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    model.layers[0].set_weights([theta_star[:features * 3].reshape(features, 3), theta_star[features * 3:]])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    influence_model = InfluenceModel(model, start_layer=0, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(32)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(16)
    calculator = FirstOrderInfluenceCalculator(influence_model, train, "exact", regularization=LAMBDA)
    predicted = calculator.estimate_influence_values_matrix(test, train).numpy().sum(axis=0) / n  # (n,)

    removed = np.argsort(-np.abs(predicted))[:40]  # the 40 most influential points, as in Koh & Liang (2017)
    base_test_loss = softmax_losses_and_residuals(theta_star, x_test, y_test)[0].sum()
    actual = []
    for index in removed:
        weights = np.ones(n)
        weights[index] = 0.0
        theta = fit_softmax_regression(x_train, y_train, weights, theta_star, LAMBDA)
        actual.append(softmax_losses_and_residuals(theta, x_test, y_test)[0].sum() - base_test_loss)
    correlation = pearsonr(predicted[removed], np.array(actual)).statistic
    print(f"leave-one-out Pearson over {len(removed)} removals: {correlation:.4f}")
    assert correlation >= 0.9, correlation
    # Same sign convention as the reference: positive influence = removing the sample increases the test loss.
    assert np.mean(np.sign(predicted[removed]) == np.sign(actual)) >= 0.9
