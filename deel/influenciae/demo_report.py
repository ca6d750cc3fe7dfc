"""What the demo shows: its two figures and the printed summary of ``report.json``
(:mod:`deel.influenciae.demo` computes them)."""
from typing import Any, Dict, List

import numpy as np

from .demo_data import K_PROPONENTS, N_GRID, SHARES, NoisyDigits, share_key


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


def _percent(value: float) -> str:
    return f"{100.0 * value:5.1f} %"


def _print_detection(report: Dict[str, Any]) -> None:
    """The table of flipped labels found by each ranking."""
    data = report["data"]
    header = [f"top {int(round(100 * share))} % ({int(round(share * data['n_train']))})" for share in SHARES]
    print(f"\nShare of the {data['n_flipped']} flipped labels among the highest-ranked training samples")
    print(f"  {'ranking':<26}{header[0]:>16}{header[1]:>16}{'ROC-AUC':>10}")
    rows = [("self-influence", report["detection"]["self_influence"]),
            ("training loss (baseline)", report["detection"]["loss"]),
            ("random (expected)", report["detection"]["random"])]
    for name, figures in rows:
        cells = [_percent(figures[share_key(share)]) for share in SHARES]
        print(f"  {name:<26}{cells[0]:>16}{cells[1]:>16}{figures['roc_auc']:>10.3f}")
    top = report["most_self_influential"]
    print(f"  {sum(entry['flipped'] for entry in top)} of the {len(top)} most self-influential samples are flipped.")


def _print_explanations(report: Dict[str, Any]) -> None:
    """The proponents of each explained test image."""
    print(f"\nTop-{K_PROPONENTS} proponents (largest g(t)ᵀ(H + λI)⁻¹g(z)) of {len(report['explanations'])} "
          "test images")
    for explanation in report["explanations"]:
        print(f"  test #{explanation['test_index']:<4} label {explanation['label']}, predicted "
              f"{explanation['predicted']}:")
        for proponent in explanation["proponents"]:
            flag = f" (flipped, true {proponent['true_label']})" if proponent["flipped"] else ""
            print(f"      train #{proponent['train_index']:<5} label {proponent['given_label']}{flag:<20} "
                  f"influence {proponent['influence']:10.4g}")


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
    _print_detection(report)
    _print_explanations(report)
    timing = report["timing_s"]
    print(f"\nTime: training {timing['training']:.1f} s, Hessian + factorisation {timing['hessian']:.1f} s, "
          f"self-influence {timing['self_influence']:.1f} s, top-k {timing['top_k']:.1f} s, "
          f"total {timing['total']:.1f} s")
    print(f"Wrote {', '.join(report['files'])}")
