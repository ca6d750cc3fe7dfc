"""Analysis and report of ``bench_scaling.py``: power-law fits, memory growth, the Markdown tables and the log-log
plots."""
import argparse
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from scaling_problems import (ARNOLDI_K, ARNOLDI_SUBSPACE, METHODS, MIB, N_SWEEP_HIDDEN,  # pylint: disable=C0411
                              N_SWEEP_TEST, P_SWEEP_TEST, P_SWEEP_TRAIN, REGULARIZATION, TRACIN_CHECKPOINTS,
                              mlp_params)

# -------- Analysis and report ------------------------------------------------------------------------------------
def power_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[Dict[str, float]]:
    """Least-squares fit of ``log y = log a + b log x``; None with fewer than two usable points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0 and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    log_x, log_y = np.log([x for x, _ in pairs]), np.log([y for _, y in pairs])
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    return {"exponent": float(exponent), "prefactor": float(np.exp(intercept)), "points": len(pairs),
            "x_min": float(min(x for x, _ in pairs)), "x_max": float(max(x for x, _ in pairs))}


CURVE_COLORS = {"psg": "tab:blue", "fwd+bwd": "tab:gray", "exact": "tab:green", "cg": "tab:red",
                "arnoldi": "tab:purple", "tracin": "tab:brown"}


def series(records: List[Dict[str, Any]], sweep: str) -> Dict[str, List[Tuple[int, float, float, float]]]:
    """``{curve: [(x, seconds, d_call MiB, stored MiB)]}`` for one sweep; x is N or P; fwd+bwd comes from the psg
    records (no memory of its own)."""
    axis = "n" if sweep == "N" else "p"
    curves: Dict[str, List[Tuple[int, float, float, float]]] = {}
    for record in records:
        if record.get("sweep") != sweep or record.get("time_s") is None:
            continue
        curves.setdefault(record["method"], []).append((record[axis], record["time_s"], record["d_call_mib"],
                                                        record.get("stored_bytes", 0) / MIB))
        if record["method"] == "psg":
            curves.setdefault("fwd+bwd", []).append((record[axis], record["times"]["fwd+bwd"], float("nan"),
                                                     float("nan")))
    return {name: sorted(points) for name, points in curves.items()}


def sweep_fits(records: List[Dict[str, Any]], sweep: str, fit_min: int) -> Dict[str, Dict[str, Any]]:
    """Power-law fits of time for every curve: on all points and on x >= ``fit_min``."""
    fits = {}
    for name, points in series(records, sweep).items():
        xs, ys = [point[0] for point in points], [point[1] for point in points]
        large = [(x, t) for x, t in zip(xs, ys) if x >= fit_min]
        fits[name] = {"all": power_fit(xs, ys),
                      "large": power_fit([x for x, _ in large], [t for _, t in large])}
    return fits


def memory_growth(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Linear fit of the N sweep's ``d_call`` (MiB per 1k samples) next to the stored arrays per 1k samples."""
    growth = {}
    for method in METHODS:
        points = [(r["n"], r["d_call_mib"], r.get("stored_bytes", 0)) for r in records
                  if r.get("sweep") == "N" and r.get("method") == method and r.get("time_s") is not None]
        if len(points) < 2:
            continue
        slope = np.polyfit([n for n, _, _ in points], [m for _, m, _ in points], 1)[0]
        largest = max(points)
        growth[method] = {"mib_per_1k": float(slope * 1000),
                          "stored_mib_per_1k": float(largest[2] / largest[0] * 1000 / MIB) if method != "exact"
                          else 0.0}
    return growth


def format_fit(fit: Optional[Dict[str, float]]) -> str:
    """``b (n pts, x_min..x_max)`` or a dash."""
    if not fit:
        return "-"
    return f"{fit['exponent']:.2f} ({fit['points']} pts, {fit['x_min']:,.0f}..{fit['x_max']:,.0f})"


def sweep_table(records: List[Dict[str, Any]], sweep: str) -> List[str]:
    """Markdown table of one sweep's records."""
    lines = ["| method | N | P | time (s) | first (s) | warm-up (s) | peak (MiB) | d_import (MiB) | d_call (MiB) "
             "| stored (MiB) | load | status / note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    chosen = [r for r in records if r.get("sweep") == sweep]
    chosen.sort(key=lambda r: (METHODS.index(r["method"]), r["n"], r.get("p", 0)))

    def number(value: Any, digits: int) -> str:
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
            else f"{value:,.{digits}f}"

    for r in chosen:
        note = r.get("note", "") if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        stored = r.get("stored_bytes")
        load = f"{r['load_start']:.1f}→{r['load_end']:.1f}" if "load_end" in r else "-"
        lines.append(f"| {r['method']} | {r['n']:,} | {r.get('p', 0):,} | {number(r.get('time_s'), 3)} "
                     f"| {number(r.get('first_s'), 3)} | {number(r.get('warmup_s'), 2)} "
                     f"| {number(r.get('peak_mib'), 0)} | {number(r.get('d_import_mib'), 0)} "
                     f"| {number(r.get('d_call_mib'), 1)} | {number(None if stored is None else stored / MIB, 1)} "
                     f"| {load} | {note.replace('|', '/')} |")
    return lines


def fits_table(fits: Dict[str, Dict[str, Any]], variable: str, fit_min: int) -> List[str]:
    """Markdown table of the fitted exponents of one sweep."""
    lines = [f"| curve | exponent b of time ~ {variable}^b, all points | b on {variable} >= {fit_min:,} |",
             "|---|---|---|"]
    for name, fit in fits.items():
        lines.append(f"| {name} | {format_fit(fit['all'])} | {format_fit(fit['large'])} |")
    return lines


def ratio_table(records: List[Dict[str, Any]]) -> List[str]:
    """Markdown table of the per-sample-gradient / plain-pass ratios."""
    lines = ["| model | P | batch | psg (ms) | fwd+bwd (ms) | ratio | psg, tf.data (ms) | fwd+bwd, tf.data (ms) "
             "| ratio, tf.data | batch_jacobian(ds) (ms) | ratio | within 3x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if r.get("sweep") != "ratio":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r.get('model', '?')} | | | | | | | | | | | {r['status']}: {r.get('note', '')} |")
            continue
        ms = {name: f"{1e3 * value:.1f}" for name, value in r["times"].items()}
        lines.append(f"| {r['model']} (N={r['n']:,}) | {r['p']:,} | {r['batch_size']} | {ms['psg']} "
                     f"| {ms['fwd+bwd']} | {r['ratio']:.2f} | {ms['psg tf.data']} | {ms['fwd+bwd tf.data']} "
                     f"| {r['ratio_tf_data']:.2f} | {ms['batch_jacobian(ds)']} | {r['ratio_batch_jacobian']:.2f} "
                     f"| {'yes' if r['ratio'] <= 3 else 'NO'} |")
    return lines


def plot_sweep(records: List[Dict[str, Any]], sweep: str, path: str) -> bool:
    """Log-log time and memory curves of one sweep into ``path``; False when there is nothing to plot."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    curves = series(records, sweep)
    if not curves:
        return False
    label = "N (training samples)" if sweep == "N" else "P (watched parameters)"
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in curves.items():
        color = CURVE_COLORS.get(name)
        time_axis.loglog([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=name)
        memory = [p for p in points if math.isfinite(p[2])]
        if memory:
            memory_axis.plot([p[0] for p in memory], [p[2] for p in memory], marker="o", color=color,
                             label=f"{name}: peak growth")
            if any(p[3] > 0 for p in memory):
                memory_axis.plot([p[0] for p in memory], [p[3] for p in memory], linestyle=":", color=color,
                                 label=f"{name}: stored by design")
    all_x = sorted({p[0] for points in curves.values() for p in points})
    if len(all_x) > 1:
        reference = curves.get("cg") or next(iter(curves.values()))
        time_axis.loglog(all_x, [reference[0][1] * x / reference[0][0] for x in all_x], "k--", alpha=0.4,
                         label=f"∝ {sweep}")
    memory_axis.set_xscale("log")
    memory_axis.set_yscale("symlog", linthresh=1.0)
    memory_axis.set_ylim(bottom=0.0)
    time_axis.set(xlabel=label, ylabel="seconds", title=f"Time vs {sweep}")
    memory_axis.set(xlabel=label, ylabel="MiB (symlog)", title=f"Memory of the timed stages vs {sweep}")
    for axis in (time_axis, memory_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def report(records: List[Dict[str, Any]], args: argparse.Namespace) -> Tuple[List[str], Dict[str, Any]]:
    """Tables (markdown lines) and the fits of every sweep."""
    lines: List[str] = []
    fits: Dict[str, Any] = {}
    settings = (f"λ = {REGULARIZATION}; CG: {args.cg_iters} iterations (tol = atol = 0); Arnoldi: subspace "
                f"{ARNOLDI_SUBSPACE}, k = {ARNOLDI_K}; TracIn: {TRACIN_CHECKPOINTS} checkpoints; batch "
                f"{args.batch_size}")
    for sweep, variable, fit_min, title in (("N", "N", args.fit_min_n, f"N sweep (MLP 64-{N_SWEEP_HIDDEN}-10, "
                                                                      f"P = {mlp_params(N_SWEEP_HIDDEN):,}, "
                                                                      f"{N_SWEEP_TEST} test samples)"),
                                            ("P", "P", args.fit_min_p, f"P sweep (MLP 64-h-10, N = {P_SWEEP_TRAIN:,}, "
                                                                      f"{P_SWEEP_TEST} test samples)")):
        if not any(r.get("sweep") == sweep for r in records):
            continue
        fits[sweep] = sweep_fits(records, sweep, fit_min)
        lines += [f"## {title}", "", settings, ""] + sweep_table(records, sweep) + [""]
        lines += [f"### Fitted exponents ({sweep} sweep)", ""] + fits_table(fits[sweep], variable, fit_min) + [""]
    if any(r.get("sweep") == "N" for r in records):
        fits["memory_N"] = memory_growth(records)
        lines += ["### Memory growth with N (linear fit of d_call)", "",
                  "| method | d_call growth (MiB per 1k samples) | stored by design (MiB per 1k samples) |",
                  "|---|---:|---:|"]
        lines += [f"| {name} | {value['mib_per_1k']:.2f} | {value['stored_mib_per_1k']:.2f} |"
                  for name, value in fits["memory_N"].items()] + [""]
    if any(r.get("sweep") == "ratio" for r in records):
        lines += ["## Per-sample gradients / plain forward+backward (digits, every layer watched, median of "
                  f"{max(args.repeats, 5)} warm runs)", ""] + ratio_table(records) + [""]
    return lines, fits
