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

It writes ``most_self_influential.png``, ``explanations.png`` and ``report.json`` to the output folder.

Before that walk-through, ``make demo`` runs the mislabeled-sample detection benchmark of every method of the
library on the same data (``deel.influenciae.benchmark``, 10 % flipped labels, 2 evaluations each) and writes its
table, curves and results under ``{output}/benchmark``.
"""
import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from .common import ExactIHVP, InfluenceModel
from .influence import FirstOrderInfluenceCalculator
from .utils.sorted_dict import ORDER

NUM_CLASSES = 10
HIDDEN_UNITS = 32
EPOCHS = 100
TRAIN_BATCH_SIZE = 128
LEARNING_RATE = 1e-2
INFLUENCE_BATCH_SIZE = 128
REGULARIZATION = 0.1
TEST_FRACTION = 0.2
SHARES = (0.10, 0.20)
N_GRID = 20
N_EXPLAINED = 3
K_PROPONENTS = 3


@dataclass
class NoisyDigits:
    """Digits split into train and test sets, with some training labels flipped.

    Attributes
    ----------
    x_train, x_test
        Images (N, 8, 8), float32 in [0, 1].
    y_train_true, y_train_given, y_test
        Integer labels (N,); ``y_train_given`` holds the flipped labels the model is trained on.
    flipped
        Sorted positions in the training set of the flipped labels.
    """

    x_train: np.ndarray
    y_train_true: np.ndarray
    y_train_given: np.ndarray
    flipped: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_noisy_digits(seed: int, noise: float, test_fraction: float = TEST_FRACTION) -> NoisyDigits:
    """Load scikit-learn's bundled digits, split them and flip a share of the training labels.

    Parameters
    ----------
    seed
        Seed of the split and of the flips.
    noise
        Share of the training labels to flip, in (0, 1); at least one label is flipped.
    test_fraction
        Share of the images kept for the test set.

    Returns
    -------
    NoisyDigits
        Each flipped label differs from the true one (a shift by 1 to 9 classes, drawn uniformly).

    Raises
    ------
    ValueError
        If ``noise`` is outside (0, 1).
    ImportError
        If scikit-learn (which ships the data) is not installed.
    """
    if not 0.0 < noise < 1.0:
        raise ValueError(f"noise must be in (0, 1), got {noise}.")
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError("The demo reads scikit-learn's bundled digits: pip install scikit-learn") from error
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    y_train_true = labels[train]
    n_flipped = max(int(round(noise * len(train))), 1)
    flipped = np.sort(rng.choice(len(train), size=n_flipped, replace=False))
    y_train_given = y_train_true.copy()
    y_train_given[flipped] = (y_train_true[flipped] + rng.integers(1, NUM_CLASSES, size=n_flipped)) % NUM_CLASSES
    return NoisyDigits(images[train], y_train_true, y_train_given, flipped, images[test], labels[test])


def build_model() -> keras.Model:
    """The classifier: ``Flatten -> Dense(32, relu) "hidden" -> Dense(10) "logits"`` on 8x8 inputs."""
    return keras.Sequential([
        keras.Input((8, 8)),
        keras.layers.Flatten(),
        keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="hidden"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ])


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Integer labels (N,) to float32 one-hot rows (N, 10)."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def train_model(data: NoisyDigits) -> keras.Model:
    """Train the classifier on the given (partly flipped) training labels with Adam."""
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train, one_hot(data.y_train_given), epochs=EPOCHS, batch_size=TRAIN_BATCH_SIZE, verbose=0)
    return model


def predict_labels(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Predicted classes (N,) of a batch of images."""
    return np.argmax(model.predict(images, batch_size=512, verbose=0), axis=1)


def share_found(scores: np.ndarray, is_flipped: np.ndarray, share: float) -> float:
    """Share of the flipped samples among the ``round(share * N)`` highest scores (ties: earlier first)."""
    ranking = np.argsort(-scores, kind="stable")
    top = ranking[:int(round(share * len(scores)))]
    return float(is_flipped[top].sum() / max(int(is_flipped.sum()), 1))


def roc_auc(scores: np.ndarray, is_flipped: np.ndarray) -> float:
    """Probability that a flipped sample scores higher than a clean one (Mann-Whitney; ties count half)."""
    flipped_scores = scores[is_flipped]
    clean_scores = np.sort(scores[~is_flipped])
    below = np.searchsorted(clean_scores, flipped_scores, side="left")
    below_or_equal = np.searchsorted(clean_scores, flipped_scores, side="right")
    return float((below + below_or_equal).sum() / (2.0 * len(flipped_scores) * len(clean_scores)))


def detection_figures(scores: np.ndarray, is_flipped: np.ndarray) -> Dict[str, float]:
    """Share of flipped labels found in the top 10 % and 20 % of a ranking, and the ROC-AUC."""
    figures = {f"top_{int(round(100 * share))}pct": share_found(scores, is_flipped, share) for share in SHARES}
    figures["roc_auc"] = roc_auc(scores, is_flipped)
    return figures


def _label_text(index: int, data: NoisyDigits, flipped_set: set) -> str:
    if index in flipped_set:
        return f"label {data.y_train_given[index]} (flipped, true {data.y_train_true[index]})"
    return f"label {data.y_train_given[index]}"


def _hide_ticks(axis: Any) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def plot_most_self_influential(path: str, data: NoisyDigits, ranking: np.ndarray, values: np.ndarray,
                               flipped_set: set) -> None:
    """Save a 4x5 grid of the 20 most self-influential training images with their labels and values."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    n_rows, n_cols = 4, 5
    figure = Figure(figsize=(2.3 * n_cols, 2.8 * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, n_cols)
    for rank, axis in enumerate(axes.ravel()):
        if rank >= min(N_GRID, len(ranking)):
            axis.set_axis_off()
            continue
        index = int(ranking[rank])
        axis.imshow(data.x_train[index], cmap="gray_r", vmin=0.0, vmax=1.0)
        _hide_ticks(axis)
        text = _label_text(index, data, flipped_set).replace(" (", "\n(")
        axis.set_title(f"#{rank + 1}: {text}\nself-influence {values[index]:.3g}", fontsize=8,
                       color="crimson" if index in flipped_set else "black")
    figure.suptitle("Most self-influential training images (red: flipped label)")
    figure.savefig(path, dpi=100)


def plot_explanations(path: str, data: NoisyDigits, explanations: List[Dict[str, Any]], flipped_set: set) -> None:
    """Save one row per test image: the image, then its proponents with their influence values."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    n_rows, n_cols = len(explanations), 1 + K_PROPONENTS
    figure = Figure(figsize=(2.4 * n_cols, 2.8 * n_rows), layout="constrained")
    axes = np.asarray(figure.subplots(n_rows, n_cols)).reshape(n_rows, n_cols)
    for row, explanation in enumerate(explanations):
        axis = axes[row, 0]
        axis.imshow(data.x_test[explanation["test_index"]], cmap="gray_r", vmin=0.0, vmax=1.0)
        _hide_ticks(axis)
        axis.set_title(f"test #{explanation['test_index']}\nlabel {explanation['label']}, "
                       f"predicted {explanation['predicted']}", fontsize=9, fontweight="bold")
        for column, proponent in enumerate(explanation["proponents"], start=1):
            axis = axes[row, column]
            index = proponent["train_index"]
            axis.imshow(data.x_train[index], cmap="gray_r", vmin=0.0, vmax=1.0)
            _hide_ticks(axis)
            text = _label_text(index, data, flipped_set).replace(" (", "\n(")
            axis.set_title(f"train #{index}: {text}\ninfluence {proponent['influence']:.3g}", fontsize=8,
                           color="crimson" if index in flipped_set else "black")
    figure.suptitle(f"Top-{K_PROPONENTS} proponents of test images (largest g(t)ᵀ(H + λI)⁻¹g(z))")
    figure.savefig(path, dpi=100)


def explain_test_images(calculator: FirstOrderInfluenceCalculator, model: keras.Model, data: NoisyDigits,
                        train_ds: tf.data.Dataset, test_indices: Sequence[int]) -> List[Dict[str, Any]]:
    """Top-k proponents (``top_k`` with ``ORDER.DESCENDING``) of some test images.

    Returns
    -------
    list of dict
        One entry per test image: ``test_index``, ``label``, ``predicted`` and ``proponents`` (a list of
        ``train_index``, ``given_label``, ``true_label``, ``flipped``, ``influence``), strongest first.
    """
    indices = np.asarray(test_indices)
    test_ds = tf.data.Dataset.from_tensor_slices((data.x_test[indices],
                                                  one_hot(data.y_test[indices]))).batch(len(indices))
    values, positions = [], []
    for _, batch_values, _, batch_positions in calculator.top_k(test_ds, train_ds, k=K_PROPONENTS,
                                                                order=ORDER.DESCENDING, return_indices=True):
        values.append(batch_values.numpy())
        positions.append(batch_positions.numpy())
    values, positions = np.concatenate(values), np.concatenate(positions)
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


def _percent(value: float) -> str:
    return f"{100.0 * value:5.1f} %"


def print_report(report: Dict[str, Any]) -> None:
    """Print the short, human-readable summary of a demo run."""
    data, model, infl = report["data"], report["model"], report["influence"]
    print("influenciae demo: flipped labels found by self-influence (scikit-learn digits, 8x8)")
    print(f"  data      {data['n_train']} train / {data['n_test']} test images; {data['n_flipped']} training "
          f"labels flipped ({100 * data['noise']:.1f} %), each to a different digit")
    print(f"  model     {model['architecture']}, Adam, {model['epochs']} epochs; accuracy "
          f"{100 * model['train_acc']:.1f} % on the given train labels, {100 * model['test_acc']:.1f} % on test")
    print(f"            it fits {model['flipped_fitted']} of the {data['n_flipped']} flipped labels (predicts the "
          "flipped label)")
    print(f"  influence exact Hessian of the mean loss w.r.t. {', '.join(infl['watched_layers'])} "
          f"(P = {infl['n_params']}), λ = {infl['regularization']:g}; Hessian eigenvalues in "
          f"[{infl['eigenvalue_min']:.2g}, {infl['eigenvalue_max']:.3g}]")
    if infl["eigenvalue_min"] + infl["regularization"] <= 0:
        print("  warning   λ does not make H + λI positive definite: some self-influence values may be negative")
    header = [f"top {int(round(100 * share))} % ({int(round(share * data['n_train']))})" for share in SHARES]
    print(f"\nShare of the {data['n_flipped']} flipped labels among the highest-ranked training samples")
    print(f"  {'ranking':<26}{header[0]:>16}{header[1]:>16}{'ROC-AUC':>10}")
    rows = [("self-influence", report["detection"]["self_influence"]),
            ("training loss (baseline)", report["detection"]["loss"]),
            ("random (expected)", report["detection"]["random"])]
    for name, figures in rows:
        cells = [_percent(figures[f"top_{int(round(100 * share))}pct"]) for share in SHARES]
        print(f"  {name:<26}{cells[0]:>16}{cells[1]:>16}{figures['roc_auc']:>10.3f}")
    top = report["most_self_influential"]
    print(f"  {sum(entry['flipped'] for entry in top)} of the {len(top)} most self-influential samples are flipped.")
    print(f"\nTop-{K_PROPONENTS} proponents (largest g(t)ᵀ(H + λI)⁻¹g(z)) of {len(report['explanations'])} "
          "test images")
    for explanation in report["explanations"]:
        print(f"  test #{explanation['test_index']:<4} label {explanation['label']}, predicted "
              f"{explanation['predicted']}:")
        for proponent in explanation["proponents"]:
            flag = f" (flipped, true {proponent['true_label']})" if proponent["flipped"] else ""
            print(f"      train #{proponent['train_index']:<5} label {proponent['given_label']}{flag:<20} "
                  f"influence {proponent['influence']:10.4g}")
    timing = report["timing_s"]
    print(f"\nTime: training {timing['training']:.1f} s, Hessian + factorisation {timing['hessian']:.1f} s, "
          f"self-influence {timing['self_influence']:.1f} s, top-k {timing['top_k']:.1f} s, "
          f"total {timing['total']:.1f} s")
    print(f"Wrote {', '.join(report['files'])}")


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
    train_predictions = predict_labels(model, data.x_train)

    loss_function = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = InfluenceModel(model, start_layer="hidden", last_layer="logits", loss_function=loss_function)
    train_ds = tf.data.Dataset.from_tensor_slices((data.x_train, one_hot(data.y_train_given))
                                                  ).batch(INFLUENCE_BATCH_SIZE)
    tick = time.perf_counter()
    ihvp = ExactIHVP(influence_model, train_ds, regularization=REGULARIZATION)
    calculator = FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)
    timing["hessian"] = time.perf_counter() - tick

    tick = time.perf_counter()
    self_influence = np.concatenate([values.numpy()[:, 0]
                                     for _, values in calculator.compute_influence_values(train_ds)])
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
        "model": {"architecture": f"Flatten-Dense({HIDDEN_UNITS}, relu)-Dense({NUM_CLASSES})", "epochs": EPOCHS,
                  "batch_size": TRAIN_BATCH_SIZE, "learning_rate": LEARNING_RATE,
                  "train_acc": float(np.mean(train_predictions == data.y_train_given)),
                  "test_acc": float(np.mean(predict_labels(model, data.x_test) == data.y_test)),
                  "flipped_fitted": int(np.sum(train_predictions[data.flipped] == data.y_train_given[data.flipped]))},
        "influence": {"method": "FirstOrderInfluenceCalculator + ExactIHVP", "watched_layers": ["hidden", "logits"],
                      "n_params": int(influence_model.nb_params), "regularization": REGULARIZATION,
                      "eigenvalue_min": float(eigenvalues.min()), "eigenvalue_max": float(eigenvalues.max())},
        "detection": {"self_influence": detection_figures(self_influence, is_flipped),
                      "loss": detection_figures(losses, is_flipped),
                      "random": {**{f"top_{int(round(100 * share))}pct": share for share in SHARES},
                                 "roc_auc": 0.5}},
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
