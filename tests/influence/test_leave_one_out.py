"""First-order influence against actual leave-one-out retraining on a convex model.

Softmax regression on scikit-learn's bundled wine data, trained to its optimum with L-BFGS (scipy) on
``J(θ) = 1/n Σ_i CE_i(θ) + λ/2 ||θ||²``. Removing z and retraining on ``1/n Σ_{i≠z} CE_i + λ/2 ||θ||²`` changes
the total test loss by ``≈ 1/n Σ_t g(t)ᵀ (H + λI)⁻¹ g(z) = 1/n Σ_t I(t, z)``, with H the mean Hessian of CE: exactly
what ``FirstOrderInfluenceCalculator(..., regularization=λ)`` computes.
"""
import numpy as np
from scipy.stats import pearsonr

from deel.influenciae.influence import FirstOrderInfluenceCalculator
from tests.convex_models import fit_softmax_regression, softmax_losses_and_residuals, wine_softmax_problem

LAMBDA = 0.01


def test_first_order_influence_predicts_leave_one_out_retraining():
    problem = wine_softmax_problem(LAMBDA)
    x_train, y_train, x_test, y_test = problem.x_train, problem.y_train, problem.x_held, problem.y_held
    n, theta_star, influence_model = len(x_train), problem.theta_star, problem.influence_model
    train, test = problem.train, problem.held
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
