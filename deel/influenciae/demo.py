"""Demo: find flipped labels with self-influence and explain predictions with proponents.

Run it with ``python -m deel.influenciae.demo --output demo_output`` (``make demo``). On scikit-learn's bundled
8x8 digits (nothing is downloaded) it

1. splits the 1,797 images 80/20 into train and test sets and flips a share (default 5 %) of the training
   labels, each to a different digit drawn at random;
2. trains a small Keras 3 network ``Flatten -> Dense(32, relu) -> Dense(10)`` (logits) on the noisy labels;
3. computes the first-order influence (Koh & Liang 2017) with the exact Hessian of the mean training loss
   w.r.t. both Dense layers (P = 2,410 parameters), damped by ``λ I``: the self-influence of a training sample
   z is ``g(z)ᵀ (H + λI)⁻¹ g(z)`` with g(z) the gradient of its loss;
4. ranks the training set by descending self-influence and reports the share of flipped labels found in the
   top 10 % and 20 %, against a random ranking (10 % and 20 % in expectation) and against ranking by the
   per-sample training loss (a simple, strong baseline);
5. lists, for three test images, the three training samples with the largest influence ``g(t)ᵀ (H + λI)⁻¹ g(z)``
   (the proponents: removing them would increase the test loss the most).

It writes ``most_self_influential.png``, ``explanations.png`` and ``report.json`` to the output folder. The data
and settings are in :mod:`deel.influenciae.demo_data`, the figures and the printed summary in
:mod:`deel.influenciae.demo_report`.

Before that walk-through, ``make demo`` runs the mislabeled-sample detection benchmark of every method of the
library on the same data (``deel.influenciae.benchmark``, 10 % flipped labels, 2 evaluations each) and writes its
table, curves and results under ``{output}/benchmark``.
"""
import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from .benchmark.digits import build_mlp, one_hot, train_classifier
from .common import ExactConfig, InfluenceModel
from .demo_data import (EPOCHS, HIDDEN_UNITS, INFLUENCE_BATCH_SIZE, K_PROPONENTS, LEARNING_RATE, N_EXPLAINED,
                        N_GRID, NUM_CLASSES, REGULARIZATION, SHARES, TRAIN_BATCH_SIZE, NoisyDigits,
                        detection_figures, load_noisy_digits, share_key)
from .demo_report import plot_explanations, plot_most_self_influential, print_report
from .influence import FirstOrderInfluenceCalculator
from .utils.sorted_dict import ORDER


def build_model() -> keras.Model:
    """The classifier: ``Flatten -> Dense(32, relu) "hidden" -> Dense(10) "logits"`` on 8x8 inputs."""
    return build_mlp((8, 8), HIDDEN_UNITS, NUM_CLASSES, layer_names=("hidden", "logits"))


def train_model(data: NoisyDigits) -> keras.Model:
    """Train the classifier on the given (partly flipped) training labels with Adam."""
    model = build_model()
    train_classifier(model, data.x_train, one_hot(data.y_train_given, NUM_CLASSES), EPOCHS, TRAIN_BATCH_SIZE,
                     LEARNING_RATE)
    return model


def predict_labels(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Predicted classes (N,) of a batch of images."""
    return np.argmax(model.predict(images, batch_size=512, verbose=0), axis=1)


def explain_test_images(calculator: FirstOrderInfluenceCalculator, model: keras.Model, data: NoisyDigits,
                        train_ds: tf.data.Dataset, test_indices: Sequence[int]) -> List[Dict[str, Any]]:
    """Top-k proponents (``influence_top_k`` with ``ORDER.DESCENDING``) of some test images.

    Returns
    -------
    list of dict
        One entry per test image: ``test_index``, ``label``, ``predicted`` and ``proponents`` (a list of
        ``train_index``, ``given_label``, ``true_label``, ``flipped``, ``influence``), strongest first.
    """
    indices = np.asarray(test_indices)
    test_ds = tf.data.Dataset.from_tensor_slices((data.x_test[indices],
                                                  one_hot(data.y_test[indices], NUM_CLASSES))).batch(len(indices))
    top = calculator.influence_top_k(test_ds, train_ds, k=K_PROPONENTS, order=ORDER.DESCENDING)
    values, positions = top.values.numpy(), top.indices.numpy()
    predicted = predict_labels(model, data.x_test[indices])
    flipped_set = set(data.flipped.tolist())
    explanations = []
    for row, test_index in enumerate(indices.tolist()):
        proponents = [{"train_index": int(train_index), "given_label": int(data.y_train_given[train_index]),
                       "true_label": int(data.y_train_true[train_index]),
                       "flipped": int(train_index) in flipped_set, "influence": float(value)}
                      for train_index, value in zip(positions[row], values[row])]
        explanations.append({"test_index": int(test_index), "label": int(data.y_test[test_index]),
                             "predicted": int(predicted[row]), "proponents": proponents})
    return explanations


def _influence(model: keras.Model, data: NoisyDigits, timing: Dict[str, float]
               ) -> Tuple[InfluenceModel, Any, FirstOrderInfluenceCalculator, tf.data.Dataset]:
    """The influence model over both Dense layers, the fitted exact solver, the calculator and the training set."""
    loss_function = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = InfluenceModel(model, start_layer="hidden", last_layer="logits", loss_function=loss_function)
    train_ds = tf.data.Dataset.from_tensor_slices((data.x_train, one_hot(data.y_train_given, NUM_CLASSES))
                                                  ).batch(INFLUENCE_BATCH_SIZE)
    tick = time.perf_counter()
    ihvp = ExactConfig(regularization=REGULARIZATION).build(influence_model, train_ds)
    calculator = FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)
    timing["hessian"] = time.perf_counter() - tick
    return influence_model, ihvp, calculator, train_ds


def _model_facts(model: keras.Model, data: NoisyDigits) -> Dict[str, Any]:
    """The ``model`` entry of the report: architecture, training settings and accuracies."""
    train_predictions = predict_labels(model, data.x_train)
    return {"architecture": f"Flatten-Dense({HIDDEN_UNITS}, relu)-Dense({NUM_CLASSES})", "epochs": EPOCHS,
            "batch_size": TRAIN_BATCH_SIZE, "learning_rate": LEARNING_RATE,
            "train_acc": float(np.mean(train_predictions == data.y_train_given)),
            "test_acc": float(np.mean(predict_labels(model, data.x_test) == data.y_test)),
            "flipped_fitted": int(np.sum(train_predictions[data.flipped] == data.y_train_given[data.flipped]))}


def run(output: str, seed: int = 0, noise: float = 0.05) -> Dict[str, Any]:
    """Run the whole demo, write the figures and ``report.json`` to ``output`` and return the report.

    Parameters
    ----------
    output
        Folder for ``most_self_influential.png``, ``explanations.png`` and ``report.json`` (created if needed).
    seed
        Seed of the split, the flips, the weights' initialisation and the choice of explained test images.
    noise
        Share of the training labels to flip.

    Returns
    -------
    dict
        The report written to ``report.json``.
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 1)
    data = load_noisy_digits(seed, noise)
    is_flipped = np.zeros(len(data.y_train_given), dtype=bool)
    is_flipped[data.flipped] = True
    flipped_set = set(data.flipped.tolist())

    tick = time.perf_counter()
    model = train_model(data)
    timing = {"training": time.perf_counter() - tick}
    model_facts = _model_facts(model, data)
    influence_model, ihvp, calculator, train_ds = _influence(model, data, timing)

    tick = time.perf_counter()
    self_influence = calculator.self_influence(train_ds).numpy()
    timing["self_influence"] = time.perf_counter() - tick
    losses = influence_model.batch_loss(train_ds).numpy()
    ranking = np.argsort(-self_influence, kind="stable")

    tick = time.perf_counter()
    test_indices = np.sort(rng.choice(len(data.y_test), size=N_EXPLAINED, replace=False))
    explanations = explain_test_images(calculator, model, data, train_ds, test_indices)
    timing["top_k"] = time.perf_counter() - tick

    os.makedirs(output, exist_ok=True)
    files = [os.path.join(output, name) for name in ("most_self_influential.png", "explanations.png", "report.json")]
    plot_most_self_influential(files[0], data, ranking, self_influence, flipped_set)
    plot_explanations(files[1], data, explanations, flipped_set)
    eigenvalues = ihvp.eigenvalues.numpy()
    report = {
        "data": {"dataset": "sklearn.datasets.load_digits", "n_train": int(len(data.y_train_given)),
                 "n_test": int(len(data.y_test)), "noise": noise, "n_flipped": int(len(data.flipped)),
                 "flipped_indices": data.flipped.tolist(), "seed": seed},
        "model": model_facts,
        "influence": {"method": "FirstOrderInfluenceCalculator + ExactIHVP", "watched_layers": ["hidden", "logits"],
                      "n_params": int(influence_model.nb_params), "regularization": REGULARIZATION,
                      "eigenvalue_min": float(eigenvalues.min()), "eigenvalue_max": float(eigenvalues.max())},
        "detection": {"self_influence": detection_figures(self_influence, is_flipped),
                      "loss": detection_figures(losses, is_flipped),
                      "random": {**{share_key(share): share for share in SHARES}, "roc_auc": 0.5}},
        "most_self_influential": [{"rank": rank + 1, "train_index": int(index), "self_influence":
                                   float(self_influence[index]), "given_label": int(data.y_train_given[index]),
                                   "true_label": int(data.y_train_true[index]), "flipped": bool(is_flipped[index])}
                                  for rank, index in enumerate(ranking[:N_GRID])],
        "explanations": explanations,
        "timing_s": timing,
        "files": files,
    }
    timing["total"] = time.perf_counter() - start
    with open(files[2], "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


DEMO_BENCHMARK_METHODS = ("first_order", "tracin", "rps_l2", "rps_lje", "arnoldi", "boundary_sample",
                          "boundary_weights", "loss_ranking")


def run_benchmark(output: str, seed: int, evaluations: int, methods: Sequence[str]) -> int:
    """Part 1: the mislabeled-sample detection benchmark over every method (10 % noise on digits).

    Delegates to the benchmark command line; writes ``results.json``, ``results.csv``, ``curves.png`` and one
    ``.npz`` per method under ``{output}/benchmark``.
    """
    # Imported here: the benchmark package is only needed by this part of the demo.
    from .benchmark import cli  # pylint: disable=import-outside-toplevel

    return cli.main(["--dataset", "digits", "--methods", ",".join(methods), "--nbr-of-evaluation", str(evaluations),
                     "--seed", str(seed), "--mislabeling-ratio", "0.1",
                     "--path-to-save", os.path.join(output, "benchmark")])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point of ``make demo``.

    ``python -m deel.influenciae.demo [--output DIR] [--seed N] [--noise F] [--evaluations E] [--methods LIST]
    [--skip-benchmark]``: part 1 runs the mislabeled-sample detection benchmark over every method (E evaluations,
    10 % noise); part 2 is the first-order walk-through above (flipped-label detection with ``--noise``, then
    data-centric explanations of test images).
    """
    parser = argparse.ArgumentParser(prog="python -m deel.influenciae.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="folder for the figures and reports")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="share of training labels to flip in the walk-through (default 0.05)")
    parser.add_argument("--evaluations", type=int, default=2, help="benchmark evaluations per method (default 2)")
    parser.add_argument("--methods", default=",".join(DEMO_BENCHMARK_METHODS),
                        help="comma-separated benchmark methods (default: all)")
    parser.add_argument("--skip-benchmark", action="store_true", help="only run the first-order walk-through")
    args = parser.parse_args(argv)
    if not 0.0 < args.noise < 1.0:
        parser.error(f"--noise must be in (0, 1), got {args.noise}")
    if args.evaluations < 1:
        parser.error(f"--evaluations must be >= 1, got {args.evaluations}")
    status = 0
    if not args.skip_benchmark:
        print("== Part 1: mislabeled-sample detection benchmark, every method (digits, 10 % flipped labels) ==")
        status = run_benchmark(args.output, args.seed, args.evaluations, args.methods.split(","))
        print("\n== Part 2: first-order walk-through: flipped labels and data-centric explanations ==")
    print_report(run(args.output, seed=args.seed, noise=args.noise))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
