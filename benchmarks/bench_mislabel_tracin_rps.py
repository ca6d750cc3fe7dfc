"""Mislabeled-sample detection on scikit-learn's digits with TracIn, RPS-L2 and RPS-LJE.

Protocol (as the reference's benchmark, SPEC §3.18, on offline data): flip the labels of 10 % of the training
samples to another class drawn uniformly, train an MLP 64-32(ReLU)-10 (last Dense without bias, logits output)
on the noisy labels, compute each method's self-influence on the unshuffled training set, rank the samples by
descending self-influence and report the share of flipped samples found in the top 10 % and top 20 % of the
ranking (a random ranking finds about 10 % and 20 %), and the area under the cumulative detection curve
(the reference's "roc"; random ≈ 0.5).

Usage: ``.venv/bin/python benchmarks/bench_mislabel_tracin_rps.py [--seeds 0 1 2] [--epochs 60]``
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
from deel.influenciae.benchmark.digits import (DIGITS_CLASSES, build_mlp, load_digits_arrays,  # noqa: E402
                                               one_hot, train_classifier)
from deel.influenciae.common import ExactConfig, InfluenceModel  # noqa: E402
from deel.influenciae.evaluation import detection_area, detection_curve  # noqa: E402
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE  # noqa: E402
from deel.influenciae.trac_in import ModelsSaver, TracIn  # noqa: E402

# pylint: enable=wrong-import-position


def noisy_digits(seed: int, ratio: float):
    """Digits scaled to [0, 1], one-hot labels with ``ratio`` of them flipped; returns (x, y_noisy, flipped)."""
    x, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), int(round(ratio * len(labels))), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, DIGITS_CLASSES, len(flipped))) % DIGITS_CLASSES
    mask = np.zeros(len(labels), bool)
    mask[flipped] = True
    return x, one_hot(labels), mask


def detection(scores: np.ndarray, flipped: np.ndarray):
    """Share of flipped samples in the top 10 % / 20 % by descending score, and the mean detection curve."""
    curve = detection_curve(scores, flipped)
    n = len(scores)
    return curve[int(0.1 * n) - 1], curve[int(0.2 * n) - 1], detection_area(curve)


def run(seed: int, epochs: int, ratio: float, lambda_l2: float):
    """Train on noisy digits, score with every method; return the detection results and training facts."""
    x, y, flipped = noisy_digits(seed, ratio)
    model = build_mlp(hidden_units=32, output_bias=False, seed=seed)
    checkpoint_epochs = list(range(epochs // 6 - 1, epochs, max(epochs // 6, 1)))
    saver = ModelsSaver(checkpoint_epochs)
    start = time.perf_counter()
    history = train_classifier(model, x, y, epochs, batch_size=64, learning_rate=3e-3, metrics=["accuracy"],
                               callbacks=[saver])
    train_time = time.perf_counter() - start
    noisy_accuracy = history.history["accuracy"][-1]
    clean_fit = float(np.mean(np.argmax(model.predict(x, verbose=0), 1)[~flipped] == np.argmax(y, 1)[~flipped]))
    memorized = float(np.mean(np.argmax(model.predict(x, verbose=0), 1)[flipped] == np.argmax(y, 1)[flipped]))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    results = {}

    def timed(name, build):
        begin = time.perf_counter()
        calculator = build()
        scores = calculator.self_influence(train).numpy()
        results[name] = detection(scores, flipped) + (time.perf_counter() - begin,)

    timed(f"TracIn (last layer, {len(saver.models)} ckpts)",
          lambda: TracIn.from_models_saver(saver, loss, start_layer=-1))
    timed(f"RPS-L2 labels (lambda={lambda_l2:g})",
          lambda: RepresenterPointL2(model, train, loss, lambda_regularization=lambda_l2))
    timed(f"RPS-L2 logits (lambda={lambda_l2:g})",
          lambda: RepresenterPointL2(model, train, None, lambda_regularization=lambda_l2, surrogate_target="logits"))
    timed("RPS-LJE (exact)", lambda: RepresenterPointLJE(InfluenceModel(model, start_layer=-1, loss_function=loss),
                                                         train, ihvp_calculator=ExactConfig()))
    return results, (noisy_accuracy, clean_fit, memorized, train_time, flipped.sum(), len(x))


def main():
    """Command line: run every seed and print the per-seed and mean tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--lambda-l2", type=float, default=1e-3)
    args = parser.parse_args()
    table = {}
    for seed in args.seeds:
        results, (acc, clean, memorized, train_time, n_flipped, n) = run(seed, args.epochs, args.ratio,
                                                                         args.lambda_l2)
        print(f"seed {seed}: {n} samples, {n_flipped} flipped; training {train_time:.1f} s, accuracy on the noisy "
              f"labels {acc:.3f}, clean samples fitted {clean:.3f}, flipped labels memorised {memorized:.3f}")
        for name, values in results.items():
            table.setdefault(name, []).append(values)
            print(f"  {name:32s} top10% {values[0]:.3f}  top20% {values[1]:.3f}  area {values[2]:.3f}  "
                  f"({values[3]:.1f} s)")
    print(f"\nMean over seeds {args.seeds} (random ranking: top10% 0.100, top20% 0.200, area 0.500)")
    print(f"{'method':32s} {'top10%':>8s} {'top20%':>8s} {'area':>8s} {'time s':>8s}")
    for name, rows in table.items():
        mean = np.mean(rows, axis=0)
        print(f"{name:32s} {mean[0]:8.3f} {mean[1]:8.3f} {mean[2]:8.3f} {mean[3]:8.1f}")


if __name__ == "__main__":
    main()
