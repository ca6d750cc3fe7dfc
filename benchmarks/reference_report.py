"""Tables and verdict of ``compare_reference.py``: timings (first pass and warm), task (f) ratios, agreement.

Imports nothing but NumPy at run time (``reference_runner.py`` imports ``reference_problem.py``, which imports
this module, in the reference's environment).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # the driver imports this module: types only
    from guarded_run import RunOutcome
    from reference_arbiter import Arbiter

PHASES = ("hessian", "self", "pairwise")


def relative_errors(values: np.ndarray, truth: np.ndarray) -> Tuple[float, float]:
    """Two relative error measures of ``values`` (a) against ``truth`` (b).

    Parameters
    ----------
    values
        The array to check.
    truth
        The array it is compared with (same number of elements).

    Returns
    -------
    tuple
        ``max|a - b| / max|b|`` and the 99th percentile of the elementwise ``|a - b| / |b|``
        (entries with ``b == 0`` skipped).
    """
    truth = np.asarray(truth, dtype=np.float64)
    diff = np.abs(np.asarray(values, dtype=np.float64).reshape(truth.shape) - truth)
    scale = np.abs(truth).max()
    nonzero = truth != 0
    p99 = float(np.percentile(diff[nonzero] / np.abs(truth[nonzero]), 99)) if nonzero.any() else 0.0
    return float(diff.max() / scale) if scale > 0 else float(diff.max()), p99


def phase_times(outcome: RunOutcome, prefix: str) -> List[float]:
    """Hessian, self-influence, their sum (task (f)) and pairwise seconds of a successful run.

    Parameters
    ----------
    outcome
        A successful outcome.
    prefix
        ``"time"`` (first pass) or ``"warm"`` (median of the repeated passes).

    Returns
    -------
    list of float
        Four times.
    """
    hessian, self_time, pairwise = (float(outcome.results[f"{prefix}_{phase}"]) for phase in PHASES)
    return [hessian, self_time, hessian + self_time, pairwise]


def timing_cells(outcome: Optional[RunOutcome], prefix: str) -> List[str]:
    """Timing-table cells of one side: Hessian, self-influence, both, pairwise seconds, peak RSS.

    Parameters
    ----------
    outcome
        The side's outcome (None when not run).
    prefix
        ``"time"`` or ``"warm"`` (see :func:`phase_times`).

    Returns
    -------
    list of str
        Five cells.
    """
    if outcome is None:
        return ["not run", "-", "-", "-", "-"]
    if not outcome.ok:
        return [outcome.status, f"({outcome.seconds:.0f} s)", "-", "-", "-"]
    return [f"{value:.3f}" for value in phase_times(outcome, prefix)] + \
        [f"{float(outcome.results['rss_pairwise_mib']):.0f}"]


def timing_row(batch: int, ref: Optional[RunOutcome], ours: Optional[RunOutcome], prefix: str) -> List[str]:
    """Cells of one row of a timing table.

    Parameters
    ----------
    batch
        Training batch size.
    ref
        Outcome of the reference (None when not run).
    ours
        Outcome of this library (None when not run).
    prefix
        ``"time"`` or ``"warm"`` (see :func:`phase_times`).

    Returns
    -------
    list of str
        Batch, reference times and RSS, our times and RSS, and the reference/ours time ratios.
    """
    ratios = ["-"] * 4
    if ref is not None and ours is not None and ref.ok and ours.ok:
        ratios = [f"{theirs / mine:.1f}" for theirs, mine in zip(phase_times(ref, prefix), phase_times(ours, prefix))]
    return [str(batch)] + timing_cells(ref, prefix) + timing_cells(ours, prefix) + ratios


def best_ratio(outcomes: Dict[Tuple[str, int], RunOutcome], prefix: str) -> Optional[Dict[str, float]]:
    """Task (f): the reference's Hessian + self-influence time at its best batch size over ours at our best.

    Parameters
    ----------
    outcomes
        Outcome per ``(side, batch)``.
    prefix
        ``"time"`` or ``"warm"`` (see :func:`phase_times`).

    Returns
    -------
    dict or None
        ``ref_batch``, ``ref_seconds``, ``ours_batch``, ``ours_seconds`` and ``ratio``; None when a side has no
        successful run.
    """
    best = {}
    for side in ("ref", "ours"):
        side_runs = [(batch, phase_times(outcome, prefix)[2]) for (name, batch), outcome in outcomes.items()
                     if name == side and outcome.ok]
        times = {batch: seconds for batch, seconds in side_runs if np.isfinite(seconds)}
        if not times:
            return None
        batch = min(times, key=times.get)
        best[side] = (batch, times[batch])
    return {"ref_batch": best["ref"][0], "ref_seconds": best["ref"][1], "ours_batch": best["ours"][0],
            "ours_seconds": best["ours"][1], "ratio": best["ref"][1] / best["ours"][1]}


def print_table(header: List[str], rows: List[List[str]]) -> None:
    """Print a right-aligned text table.

    Parameters
    ----------
    header
        Column titles.
    rows
        Cells, one list per row.
    """
    widths = [max(len(row[col]) for row in [header] + rows) for col in range(len(header))]
    for line in [header] + rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def accuracy_rows(batch: int, sides: Dict[str, Optional[RunOutcome]],
                  arbiters: Sequence[Arbiter]) -> Tuple[List[List[str]], Dict[str, float]]:
    """Rows of the agreement table for one batch size.

    Parameters
    ----------
    batch
        Training batch size.
    sides
        Outcomes of ``"ours"`` and ``"ref"`` (None when not run).
    arbiters
        Float64 ground truths.

    Returns
    -------
    tuple
        Table rows (ours vs ref, then each side vs each arbiter, when available) and a mapping of
        ``"<comparison>/<self|pair>/<max|p99>"`` to the error values.
    """
    done = {name: outcome.results for name, outcome in sides.items() if outcome is not None and outcome.ok}
    comparisons = [("ours vs ref", done["ours"], done["ref"])] if len(done) == 2 else []
    comparisons += [(f"{name} vs {arbiter.name}", results,
                     {"self_influence": arbiter.self_influence, "pairwise": arbiter.pairwise})
                    for arbiter in arbiters for name, results in done.items()]
    rows, metrics = [], {}
    for label, values, truth in comparisons:
        errors = relative_errors(values["self_influence"], truth["self_influence"]) + \
            relative_errors(values["pairwise"], truth["pairwise"])
        metrics.update({f"{label}/{name}": value
                        for name, value in zip(("self/max", "self/p99", "pair/max", "pair/p99"), errors)})
        rows.append([str(batch), label] + [f"{value:.1e}" for value in errors])
    return rows, metrics


def report(batches: List[int], outcomes: Dict[Tuple[str, int], RunOutcome], arbiters: Sequence[Arbiter],
           tolerance: float) -> Tuple[bool, Dict[str, Dict[str, float]]]:
    """Print the timing and agreement tables and the verdict.

    Parameters
    ----------
    batches
        All batch sizes, in order.
    outcomes
        Outcome per ``(side, batch)``.
    arbiters
        Float64 ground truths.
    tolerance
        PASS threshold of the ours-vs-reference max relative differences.

    Returns
    -------
    tuple
        Whether every compared batch size passes, and the error metrics per batch size.
    """
    header = ["batch", "ref hess", "ref self", "ref h+s", "ref pair", "ref RSS", "ours hess", "ours self", "ours h+s",
              "ours pair", "ours RSS", "x hess", "x self", "x h+s", "x pair"]
    titles = {"time": "first pass in a fresh process, tracing included",
              "warm": "median of the repeated passes in the same process (new IHVP and calculator each time)"}
    for prefix, title in titles.items():
        print(f"\nTimings (seconds; {title}) and peak RSS (MiB)")
        print_table(header, [timing_row(b, outcomes.get(("ref", b)), outcomes.get(("ours", b)), prefix)
                             for b in batches])
    print("(h+s = Hessian + self-influence, task (f); x = reference time / our time)")
    for prefix, label in (("time", "first pass"), ("warm", "repeated passes")):
        best = best_ratio(outcomes, prefix)
        if best is not None:
            print(f"task (f), {label}: reference {best['ref_seconds']:.3f} s at its best batch size "
                  f"{best['ref_batch']}, ours {best['ours_seconds']:.3f} s at batch size {best['ours_batch']}: "
                  f"{best['ratio']:.1f}x")
    print("\nAgreement: max|a-b|/max|b| and 99th percentile of |a-b|/|b| (a vs b)")
    for arbiter in arbiters:
        print(f"  {arbiter.name}: float64 closed form, pinv keeping |eig| > {arbiter.rcond:.3g} max|eig| "
              f"(rank {arbiter.rank}; nearest eigenvalue a factor {arbiter.margin:.6g} from the cut-off)")
    rows, metrics = [], {}
    for batch in batches:
        batch_rows, metrics[str(batch)] = accuracy_rows(
            batch, {"ours": outcomes.get(("ours", batch)), "ref": outcomes.get(("ref", batch))}, arbiters)
        rows.extend(batch_rows)
    print_table(["batch", "comparison", "self max", "self p99", "pair max", "pair p99"], rows)
    failed = [f"{side} {batch}: {outcome.status}" for (side, batch), outcome in outcomes.items() if not outcome.ok]
    if failed:
        print("did not complete: " + ", ".join(failed))
    compared = [m for m in metrics.values() if "ours vs ref/self/max" in m]
    passed = bool(compared) and all(max(m["ours vs ref/self/max"], m["ours vs ref/pair/max"]) <= tolerance
                                    for m in compared)
    print(f"\n{'PASS' if passed else 'FAIL'}: ours vs reference within {tolerance:g} (max relative) "
          f"on {len(compared)} batch size(s)")
    return passed, metrics
