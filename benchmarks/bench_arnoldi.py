"""Arnoldi influence against exact first-order influence on a small MLP trained on scikit-learn's digits.

Both sides use the same damping λ (``regularization``): exact values are ``g_tᵀ (H + λI)⁻¹ g_z`` over every watched
parameter (P = 2,410 for the default MLP), Arnoldi values ``Σ_j (g_t·G_j)(g_z·G_j)/(λ_j + λ)`` on the k Ritz pairs of
largest magnitude. For each test row (one test sample against every training sample) we compute the Pearson and
Spearman correlations and the overlap of the 10 most influential training samples, and report their means.

Run from the repository root::

    .venv/bin/python benchmarks/bench_arnoldi.py                 # k = 10, 50, 200
    .venv/bin/python benchmarks/bench_arnoldi.py --ks 50 --subspace-factor 2 --test-rows 50
"""
import argparse
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from deel.influenciae.benchmark.digits import (DIGITS_SAMPLES, build_mlp, load_digits_split, one_hot,
                                               train_classifier)
from deel.influenciae.common import InfluenceModel
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator

# pylint: enable=wrong-import-position


def digits_problem(hidden: int = 32, epochs: int = 30, n_train: int = None, seed: int = 0):
    """A trained ``Dense(hidden, tanh) → Dense(10)`` MLP on digits scaled to [0, 1], its influence model and datasets.

    The training set is the first ``n_train`` samples of the seeded permutation (default 80 %), the test set the
    rest.
    """
    split = load_digits_split(seed, n_train=int(0.8 * DIGITS_SAMPLES) if n_train is None else n_train,
                              test_first=False)
    model = build_mlp(hidden_units=hidden, activation="tanh", seed=seed)
    train_classifier(model, split.x_train, one_hot(split.y_train), epochs, batch_size=64, learning_rate=1e-2)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((split.x_train, one_hot(split.y_train))).batch(128)
    test = tf.data.Dataset.from_tensor_slices((split.x_test, one_hot(split.y_test))).batch(128)
    return influence_model, train, test


def compare_rows(approx: np.ndarray, exact: np.ndarray, top: int = 10):
    """Mean over rows of Pearson, Spearman and top-``top`` overlap between two (T, N) value matrices."""
    pearson = np.mean([pearsonr(a, e).statistic for a, e in zip(approx, exact)])
    spearman = np.mean([spearmanr(a, e).statistic for a, e in zip(approx, exact)])
    overlap = np.mean([len(set(np.argsort(-a)[:top]) & set(np.argsort(-e)[:top])) / top
                       for a, e in zip(approx, exact)])
    return float(pearson), float(spearman), float(overlap)


def main():
    """Train the MLP, compute exact values once, then Arnoldi for every k, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--subspace-factor", type=float, default=2.0,
                        help="subspace_dim = min(P, factor · k) (default 2)")
    parser.add_argument("--regularization", type=float, default=0.1)
    parser.add_argument("--test-rows", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, train, test = digits_problem(args.hidden, seed=args.seed)
    test = test.unbatch().take(args.test_rows).batch(args.test_rows)
    print(f"digits MLP: P = {model.nb_params}, N_train = {sum(1 for _ in train.unbatch())}, "
          f"test rows = {args.test_rows}, λ = {args.regularization}")
    start = time.perf_counter()
    exact = FirstOrderInfluenceCalculator(model, train, "exact", regularization=args.regularization)
    exact_values = exact.influence_matrix(test, train).numpy()
    print(f"exact first order: {time.perf_counter() - start:.2f} s")
    print(f"{'k':>5} {'subspace':>8} {'Pearson':>8} {'Spearman':>8} {'top-10':>7} {'seconds':>8}")
    for k in args.ks:
        subspace = int(min(model.nb_params, max(k, round(args.subspace_factor * k))))
        start = time.perf_counter()
        arnoldi = ArnoldiInfluenceCalculator(model, train, subspace_dim=subspace, force_hermitian=True,
                                             k_largest_eig_vals=k, regularization=args.regularization, seed=args.seed)
        values = arnoldi.influence_matrix(test, train).numpy()
        elapsed = time.perf_counter() - start
        pearson, spearman, overlap = compare_rows(values, exact_values)
        print(f"{k:>5} {subspace:>8} {pearson:>8.3f} {spearman:>8.3f} {overlap:>7.2f} {elapsed:>8.2f}")


if __name__ == "__main__":
    main()
