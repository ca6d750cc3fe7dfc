"""Projected methods side by side with their peers: the library's TRAK and projected TracIn against traker's
``TRAKer`` (CPU ``BasicProjector``) and Captum's ``TracInCPFastRandProj``, end to end, in the same run.

On the digits MLP of the fidelity benchmark (:mod:`fidelity_problems`: 64-64-64-64-10, P = 13,120, trained with seed 0
and its four checkpoints, the weights ``bench_fidelity.py`` explains; N = 1,497 training and T = 300 test samples):

* ours, in this process (TensorFlow, float32): :class:`~deel.influenciae.trak.TRAK` on the final checkpoint and over
  the four (margin gradients, :func:`~deel.influenciae.trak.margin_loss`, ``reweight="margin"``, dense
  ``GradientProjector(d, seed=0, kind=--kind)`` (``rademacher`` by default; ``srht``: the subsampled randomized
  Hadamard transform), default damping λ = 0.1 × mean eigenvalue of ΦᵀΦ/N), projected
  :class:`~deel.influenciae.trac_in.TracIn` over the four checkpoints (same projector) and exact TracIn (reference);
  each timed as one user would run it: build the calculator (TRAK: the featurisation pass and the eigendecomposition)
  plus ``influence_matrix(test, train)`` (T, N);
* the peers, in ``benchmarks/.venv-peers`` (``peers/run_projection.py``, torch twins of the same weights, float32,
  ``torch.set_num_threads(--threads)``): traker's ``TRAKer`` (featurize, finalize_features, score, finalize_scores) at
  its default λ = 0 and at our default λ converted to its scale (``λ · d · N / P``, see the worker), on the final
  checkpoint and over the four; Captum's ``TracInCPFastRandProj`` (``projection_dim=d``: gradients of the last
  Linear layer only, 64 × 10 = 640 weights here, so that at d ≥ 640 nothing is projected) and exact ``TracInCP``.

Timings: each side is run ``--repeats`` + 1 times; the first call (tracing, allocations) is reported apart and the
ratios use the medians of the later calls. The "fit" column splits out the training side: ours, building the
calculator (TRAK: the featurisation pass and the eigendecomposition); traker, featurising the training set; Captum,
building ``TracInCPFastRandProj``. Agreement (as measured, nothing forced): Pearson over all (T, N) values,
Spearman over all values, mean overlap of the top-10 training samples per test sample; the first row compares our TRAK
with itself under another projection seed (seed 1, same λ: the agreement two projections can reach). traker differs
from ours by design: its own Gaussian projection (another one per checkpoint), gradients normalised by √P, an
arbitrary positive factor per model (its inverse kernel is divided by the mean of its absolute entries: over an
ensemble the models are weighted differently) and the ``1 - p`` weights averaged over models before multiplying; on
one model at the same λ the two estimate the same scores up to a positive factor, with independent projection errors.
At λ = 0 (traker's default) both are ill-posed here: N = 1,497 < d, so ΦᵀΦ is singular (ours takes a pseudo-inverse,
traker inverts the singular float32 matrix).

Usage: ``.venv/bin/python benchmarks/bench_projection_peers.py [--dim 2048] [--repeats 1] [--kind srht]``
(``make bench-projection-peers``; the peer venv comes from ``benchmarks/bench_peers.py --setup``); writes
``benchmarks/results/projection_peers.{md,json}``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
# pylint: disable=wrong-import-position
import common  # noqa: E402
import fidelity_problems as problems  # noqa: E402
from bench_fidelity import write_peer_problem  # noqa: E402
from fidelity_methods import TRAIN_BATCH, checkpoint_models  # noqa: E402
from deel.influenciae.common import BaseInfluenceModel, GradientProjector  # noqa: E402
from deel.influenciae.trac_in import TracIn  # noqa: E402
from deel.influenciae.trak import TRAK, margin_loss  # noqa: E402
# pylint: enable=wrong-import-position

PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
RESULTS = HERE / "results"


def load() -> str:
    """The load averages (1, 5, 15 min) and the number of CPUs, as one line."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def timed(function: Callable[[], np.ndarray], repeats: int) -> Tuple[np.ndarray, float, float]:
    """``(result of the last call, first call's seconds, median seconds of the later calls)``."""
    values, seconds = None, []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        values = function()
        seconds.append(time.perf_counter() - start)
    return values, seconds[0], statistics.median(seconds[1:]) if repeats else seconds[0]


def run_ours(model: keras.Model, checkpoints: List[List[np.ndarray]], data: Tuple[tf.data.Dataset, tf.data.Dataset],
             dim: int, repeats: int, kind: str = "rademacher") -> Dict[str, Dict[str, object]]:
    """Our four calculations, end to end, and the extra TRAK matrices at the λ the comparisons need."""
    train, test = data
    margin_models = checkpoint_models(model, checkpoints, margin_loss)
    ce_models = checkpoint_models(model, checkpoints)
    rates = [problems.LEARNING_RATE] * len(checkpoints)
    built: Dict[str, TRAK] = {}
    fit_seconds: Dict[str, float] = {}

    def trak(name: str, models: list) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            start = time.perf_counter()
            built[name] = TRAK(models, train, projector=GradientProjector(dim, seed=0, kind=kind), reweight="margin")
            fit_seconds[f"trak_{name}"] = time.perf_counter() - start  # the featurisation pass and eigh
            return np.asarray(built[name].influence_matrix(test, train), np.float64)
        return run

    def tracin(projector: Optional[GradientProjector]) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(TracIn(ce_models, rates, projector=projector).influence_matrix(test, train),
                                  np.float64)

    # the computation of Captum's TracInCPFastRandProj: the last layer's weight matrix only (not its bias)
    last_layer = [BaseInfluenceModel(influence_model.model, [influence_model.model.layers[-1].kernel],
                                     loss_function=influence_model.loss_function) for influence_model in ce_models]
    runs = {"trak_final": trak("final", margin_models[-1:]), "trak_ensemble": trak("ensemble", margin_models),
            "tracin_projected": tracin(GradientProjector(dim, seed=0, kind=kind)), "tracin_exact": tracin(None),
            "tracin_last_layer": lambda: np.asarray(TracIn(last_layer, rates).influence_matrix(test, train),
                                                    np.float64)}
    out: Dict[str, Dict[str, object]] = {}
    for name, run in runs.items():
        scores, first, warm = timed(run, repeats)
        out[name] = {"scores": scores, "first": first, "seconds": warm}
        if name in fit_seconds:
            out[name]["fit"] = fit_seconds[name]  # of the last call
        shown = f" (fit {fit_seconds[name]:.2f} s)" if name in fit_seconds else ""
        print(f"  ours {name:17s} first {first:7.2f} s, then {warm:7.2f} s{shown}  ({load()})", flush=True)
    heuristic = built["final"].dampings[0]
    out["trak_final"]["lambda"] = heuristic
    out["trak_ensemble"]["lambda"] = built["ensemble"].dampings
    # untimed extras: λ = 0 (traker's default) and, for the ensemble, the final model's λ for every model (traker has
    # one λ for all of its models)
    for name, calculator in built.items():
        out[f"trak_{name}_lambda0"] = {"scores": np.asarray(
            calculator.with_regularization(0.0, damping_heuristic=None).influence_matrix(test, train), np.float64)}
    out["trak_ensemble_matched"] = {"scores": np.asarray(built["ensemble"].with_regularization(
        heuristic, damping_heuristic=None).influence_matrix(test, train), np.float64)}
    # the projection's own noise: another seed, the same λ
    other = TRAK(margin_models[-1:], train, projector=GradientProjector(dim, seed=1, kind=kind), reweight="margin")
    out["trak_final_seed1"] = {"scores": np.asarray(other.with_regularization(heuristic, damping_heuristic=None)
                                                    .influence_matrix(test, train), np.float64)}
    return out


def run_peers(problem_path: Path, output: Path, dim: int, heuristic: float, args: argparse.Namespace
              ) -> Optional[Dict[str, np.ndarray]]:
    """The peer worker (traker at λ = 0 and at our default λ, Captum fast and exact); its arrays or None."""
    if not PEER_PYTHON.exists():
        print(f"  (no peer venv at {PEER_PYTHON}: run `.venv/bin/python benchmarks/bench_peers.py --setup`)")
        return None
    command = [str(PEER_PYTHON), str(HERE / "peers" / "run_projection.py"), "--problem", str(problem_path),
               "--output", str(output), "--proj-dims", str(dim), "--captum-proj-dims", str(dim), "--dampings",
               repr(heuristic), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    print("\n".join("  peer " + line for line in completed.stdout.strip().splitlines()), flush=True)
    if completed.returncode != 0:
        print(f"  peer worker failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        return None
    with np.load(output) as archive:
        return {key: archive[key] for key in archive.files}


def comparisons(ours: Dict[str, Dict[str, object]], peer: Dict[str, np.ndarray], dim: int, heuristic: float,
                n_checkpoints: int) -> List[Dict[str, object]]:
    """The rows: ours against ours with another projection seed (the projection noise), then against the peers."""
    rows: List[Dict[str, object]] = [
        {"comparison": f"TRAK final: ours seed 0 vs ours seed 1, same λ = {heuristic:.3g} (projection noise)",
         "ours": "trak_final", "peer": "ours seed 1",
         **common.agreement(ours["trak_final"]["scores"], ours["trak_final_seed1"]["scores"])}]
    matched = f"{heuristic:.0e}"
    plan = [
        ("TRAK final: defaults (ours λ = 0.1·mean eig, traker λ = 0)", "trak_final", f"traker_final_d{dim}__own", True),
        (f"TRAK final: same λ = {heuristic:.3g} (traker {heuristic:.3g}·dN/P)", "trak_final",
         f"traker_final_d{dim}__{matched}", False),
        ("TRAK final: same λ = 0", "trak_final_lambda0", f"traker_final_d{dim}__own", False),
        (f"TRAK {n_checkpoints} ckpts: defaults", "trak_ensemble", f"traker_ensemble_d{dim}__own", True),
        (f"TRAK {n_checkpoints} ckpts: same λ = {heuristic:.3g}", "trak_ensemble_matched",
         f"traker_ensemble_d{dim}__{matched}", False),
        (f"TRAK {n_checkpoints} ckpts: same λ = 0", "trak_ensemble_lambda0", f"traker_ensemble_d{dim}__own", False),
        ("TracIn projected (all layers) vs Captum FastRandProj (last layer)", "tracin_projected",
         f"captum_fastrandproj_d{dim}", True),
        ("TracIn projected (all layers) vs Captum TracInCP (exact)", "tracin_projected", "captum_tracincp_all",
         False),
        ("TracIn exact vs Captum TracInCP (exact)", "tracin_exact", "captum_tracincp_all", True),
        ("TracIn of the last layer's weights (exact) vs Captum FastRandProj (the same: 640 ≤ d weights, not "
         "projected)", "tracin_last_layer", f"captum_fastrandproj_d{dim}", True)]
    for label, mine, theirs, timed_row in plan:
        if f"scores__{theirs}" not in peer:
            continue
        stats = common.agreement(ours[mine]["scores"], peer[f"scores__{theirs}"])
        row: Dict[str, object] = {"comparison": label, "ours": mine, "peer": theirs, **stats}
        if timed_row:
            row.update({"ours_first": ours[mine]["first"], "ours_seconds": ours[mine]["seconds"],
                        "peer_first": float(peer[f"first_seconds__{theirs}"]),
                        "peer_seconds": float(peer[f"seconds__{theirs}"])})
            row["ratio"] = row["ours_seconds"] / row["peer_seconds"]
            row["ours_fit"] = ours[mine].get("fit", float("nan"))
            row["peer_fit"] = float(peer.get(f"fit_seconds__{theirs.split('__')[0]}", np.nan))
        rows.append(row)
    return rows


def markdown(rows: List[Dict[str, object]], header: str) -> str:
    """The table: seconds (warm medians), ours/peer ratio, agreement."""
    lines = [header, "", "| comparison | ours (s) | peer (s) | ours/peer | fit: ours / peer (s) | Pearson | Spearman "
             "| top-10 overlap |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        times = "- | - | - | -"
        if "ratio" in row:
            fits = " / ".join("-" if not np.isfinite(row[key]) else f"{row[key]:.2f}"
                              for key in ("ours_fit", "peer_fit"))
            times = f"{row['ours_seconds']:.2f} | {row['peer_seconds']:.2f} | {row['ratio']:.2f} | {fits}"
        lines.append(f"| {row['comparison']} | {times} | {row['pearson']:.3f} | {row['spearman']:.3f} | "
                     f"{row['topk']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Train, run ours and the peers, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048, help="projection dimension d (default 2048)")
    parser.add_argument("--kind", default="rademacher", choices=("rademacher", "gaussian", "srht"),
                        help="our GradientProjector's kind (default rademacher)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first one (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the peer worker (default 2)")
    parser.add_argument("--json", type=Path, default=RESULTS / "projection_peers.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "projection_peers.md")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    problem = problems.load_problem("mlp")
    model, checkpoints = problems.FastTrainer(problem).train(problem.x_train, problem.y_train, seed=0,
                                                             checkpoint_epochs=problems.CHECKPOINT_EPOCHS)
    model.set_weights(checkpoints[-1])
    train = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train)).batch(TRAIN_BATCH)
    test = tf.data.Dataset.from_tensor_slices((problem.x_test, problem.y_test)).batch(len(problem.x_test))
    print(f"{problem.description}; d = {args.dim}; T = {len(problem.x_test)}; {load()}", flush=True)
    ours = run_ours(model, checkpoints, (train, test), args.dim, args.repeats, args.kind)
    heuristic = float(ours["trak_final"]["lambda"])
    with tempfile.TemporaryDirectory() as folder:
        problem_path = Path(folder) / "problem.npz"
        write_peer_problem(problem_path, problem, checkpoints, np.asarray(model(problem.x_test)))
        peer = run_peers(problem_path, Path(folder) / "projection.npz", args.dim, heuristic, args)
    if peer is None:
        return 1
    rows = comparisons(ours, peer, args.dim, heuristic, len(checkpoints))
    header = (f"**{problem.description}**; d = {args.dim} (our projector: {args.kind}), T = {len(problem.x_test)}; "
              f"ours TensorFlow, peers torch {args.threads} threads; medians of {args.repeats} call(s) after a first "
              f"one; {load()} at the end")
    table = markdown(rows, header)
    print("\n" + table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {"header": header, "rows": rows, "lambda_default_final": heuristic,
               "lambda_default_ensemble": ours["trak_ensemble"]["lambda"],
               "traker_lambda_scale": float(peer.get(f"lambda_scale__traker_final_d{args.dim}", np.nan)),
               "first_calls": {name: {"ours": value.get("first")} for name, value in ours.items() if "first" in value}}
    args.json.write_text(json.dumps(summary, indent=1, default=float))
    args.markdown.write_text(table)
    print(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
