"""Side-by-side benchmark of this library against its peers: pyDVL (influence functions) and Captum (TracInCP).

On identical data and weights (scikit-learn's bundled digits scaled to [0, 1], 1,437 train x 100 test; MLP
64-32-10 with ReLU and logits, trained once with Keras 3, seeded; every parameter watched, P = 2,410; softmax
cross-entropy; Hessian of the mean loss; damping λ = 0.1 meaning ``(H + λI)``), four tasks, each side in its
own guarded subprocess:

a. ``exact``: first-order influence with the full Hessian: ours ``ExactIHVP`` vs pyDVL ``DirectInfluence`` and
   Captum ``NaiveInfluenceFunction`` (all P eigenpairs; its summed-loss Hessian is n times ours, so its
   ``hessian_reg`` is n λ and its values are multiplied by n, see ``peers/run_captum.py``);
b. ``cg``: conjugate gradients to a relative residual (default 1e-6, ``atol = 0``): ours
   ``ConjugateGradientDescentIHVP`` vs pyDVL ``CgInfluence`` (block CG); the residuals
   ``||(H + λI) x - g|| / ||g||`` of both sides' test factors are measured against the exact Hessian;
c. ``arnoldi``: rank-50 Arnoldi (Krylov dimension 101, pyDVL's default for rank 50): ours
   ``ArnoldiInfluenceCalculator`` vs pyDVL ``ArnoldiInfluence`` (ARPACK); both also against our exact values;
d. ``tracin``: TracIn over 4 checkpoints of the Keras training, ``Σ_k lr_k g_k(t)·g_k(z)``: ours ``TracIn`` vs
   Captum ``TracInCP``;
e. the self-influence of all training points, for every task (pyDVL: the diagonal of blocks of
   ``influences(x_b, y_b)``, it has no self-influence entry point; Captum: ``TracInCP.self_influence``).

Each process times three phases — ``fit`` (building the calculator: Hessian, factorisation, Krylov basis),
``pair`` (the (100, 1437) matrix) and ``self`` (1,437 values) — once as a first call (tracing, caches) and then
``--repeats`` more times; the table gives the first call and the median of the others. Sides alternate: in
round r the peer goes first when r is odd, and ``--rounds`` > 1 repeats whole processes (medians over rounds).

Usage: ``.venv/bin/python benchmarks/bench_peers.py`` (``--setup`` creates ``benchmarks/.venv-peers`` only;
``--help`` for options).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR / "peers"))
# pylint: disable=wrong-import-position
import common  # noqa: E402
from guarded_run import RunOutcome, ours_env, run_reported  # noqa: E402

PEER_VENV = BENCH_DIR / ".venv-peers"
PEER_PYTHON = PEER_VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"
# pyDVL's ``[influence]`` extra minus torch; numpy<2 because pydvl 0.10 pins it (zarr 3 would pull numpy 2).
PEER_PACKAGES = ("pydvl", "captum", "numpy<2", "scikit-learn", "dask", "distributed", "zarr>=3,<4")
# kronfluence (``peers/run_fidelity.py``): its dependencies without torchvision (unused, and it would pull a torch
# of its own), installed with the torch pin; then kronfluence itself with ``--no-deps``.
KRONFLUENCE_PIN = "kronfluence==1.0.1"
KRONFLUENCE_DEPS = ("accelerate", "einops", "einconv", "opt-einsum", "safetensors", "tqdm")
# traker (TRAK, ``peers/run_projection.py``): it requires only torch>=2.0, numpy and tqdm (``fast_jl``, its CUDA
# projector, is an extra we do not install: on CPU it uses its ``BasicProjector``); installed with the torch and numpy
# pins so that pip keeps both.
TRAKER_PIN = "traker==0.3.2"
PEERS = {"exact": ("pydvl", "captum"), "cg": ("pydvl",), "arnoldi": ("pydvl",), "tracin": ("captum",)}
PHASES = ("fit", "pair", "self")
# pyDVL 0.10 documents ``influences(..., mode=Up)`` as <H^-1 ∇ℓ(test), ∇ℓ(train)>, no minus sign: the same
# sign as ours (positive: removing the training point increases the test loss). Captum's TracInCP has our sign.
PEER_SIGN = {"pydvl": 1.0, "captum": 1.0}


# -------- Peer environment ---------------------------------------------------------------
def peers_ready() -> bool:
    """Whether the peer venv imports pyDVL's torch influence models, Captum, kronfluence 1.0.1 and traker 0.3.2 (its
    ``TRAKer`` and CPU ``BasicProjector``) with torch 2.13.0."""
    if not PEER_PYTHON.exists():
        return False
    probe = ("import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; "
             "from pydvl.influence.torch import DirectInfluence, CgInfluence, ArnoldiInfluence; "
             "from captum.influence import TracInCP; "
             "import importlib.metadata as m; assert m.version('kronfluence') == '1.0.1'; "
             "from kronfluence.analyzer import Analyzer; "
             "assert m.version('traker') == '0.3.2'; from trak import TRAKer; "
             "from trak.projectors import BasicProjector")
    completed = subprocess.run([str(PEER_PYTHON), "-c", probe], env=peer_env(), capture_output=True, check=False)
    return completed.returncode == 0


def setup_peers(force: bool = False) -> None:
    """Create ``benchmarks/.venv-peers``: pinned CPU torch first, then pyDVL, Captum, kronfluence and traker (needs
    PyPI); an existing venv that lacks a later addition (traker) is completed, not recreated."""
    if force and PEER_VENV.exists():
        subprocess.run(["rm", "-rf", str(PEER_VENV)], check=True)
    if peers_ready():
        print(f"peer environment ready: {PEER_VENV}")
        return
    print(f"{'completing' if PEER_PYTHON.exists() else 'creating'} the peer environment in {PEER_VENV}")
    steps = [] if PEER_PYTHON.exists() else [[getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                                              str(PEER_VENV)]]
    # torch first and pinned, so that nothing later can swap it for another (CUDA) build.
    steps += [[str(PEER_PYTHON), "-m", "pip", "install", "--quiet", TORCH_PIN],
              [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", TORCH_PIN, *PEER_PACKAGES],
              [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", TORCH_PIN, *KRONFLUENCE_DEPS],
              [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", KRONFLUENCE_PIN],
              [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", TORCH_PIN, "numpy<2", "tqdm", TRAKER_PIN]]
    for step in steps:
        print("  $", " ".join(step))
        subprocess.run(step, check=True)
    shown = subprocess.run([str(PEER_PYTHON), "-m", "pip", "show", "torch"], capture_output=True, text=True,
                           check=True).stdout
    version = next((line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Version:")), "")
    if not version.startswith("2.13.0"):
        raise RuntimeError(f"torch in {PEER_VENV} is {version!r}, expected 2.13.0 (CPU)")
    if not peers_ready():
        raise RuntimeError(f"the peer environment in {PEER_VENV} does not import pyDVL, Captum, kronfluence and "
                           "traker")
    print(f"peer environment ready (torch {version})")


def peer_env() -> Dict[str, str]:
    """Environment of the peer processes: no ``PYTHONPATH`` (nothing of this repository leaks in)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


# -------- Running ------------------------------------------------------------------------
def run_side(side: str, task: str, args: argparse.Namespace, round_index: int) -> RunOutcome:
    """Run one side of one task in a guarded subprocess."""
    output = args.workdir / f"{side}_{task}_r{round_index}.npz"
    output.unlink(missing_ok=True)
    options = ["--task", task, "--problem", str(args.problem), "--output", str(output),
               "--repeats", str(args.repeats), "--cg-rtol", str(args.cg_rtol), "--cg-maxiter", str(args.cg_maxiter),
               "--cg-recycle", str(args.cg_recycle),
               "--rank", str(args.rank), "--krylov", str(args.krylov)]
    if side == "ours":
        command, env = [sys.executable, str(BENCH_DIR / "peers" / "run_ours.py")] + options, ours_env()
    else:
        command, env = [str(PEER_PYTHON), str(BENCH_DIR / "peers" / f"run_{side}.py")] + options, peer_env()
    print(f"  {task:8s} {side:7s} round {round_index} ...", end=" ", flush=True)
    return run_reported(command, env, output, (args.timeout, args.max_rss_mib))


def merge_rounds(outcomes: List[RunOutcome]) -> Optional[Dict[str, np.ndarray]]:
    """Values of the last successful round; timings as medians over rounds; peak RSS as the maximum."""
    good = [outcome.results for outcome in outcomes if outcome.ok]
    if not good:
        return None
    merged = dict(good[-1])
    for phase in PHASES:
        key = f"time_{phase}"
        merged[key] = np.asarray([np.median([result[key][0] for result in good]),
                                  np.median([result[key][1] for result in good]), len(good)])
    merged["rss_mib"] = np.float64(max(float(result["rss_mib"]) for result in good))
    return merged


def relative_residuals(hessian: np.ndarray, factors: np.ndarray, grads: np.ndarray) -> Tuple[float, float]:
    """Median and maximum over test samples of ``||(H + λI) x - g|| / ||g||`` (float64, Keras order)."""
    damped = hessian.astype(np.float64) + common.REGULARIZATION * np.eye(hessian.shape[0])
    residual = factors.astype(np.float64) @ damped - grads.astype(np.float64)
    ratios = np.linalg.norm(residual, axis=1) / np.linalg.norm(grads.astype(np.float64), axis=1)
    return float(np.median(ratios)), float(np.max(ratios))


# -------- Report -------------------------------------------------------------------------
Results = Dict[str, Dict[str, Optional[Dict[str, np.ndarray]]]]


def fmt(value: float, width: int = 8, digits: int = 3) -> str:
    """Right-aligned number, ``-`` for NaN."""
    return f"{'-':>{width}s}" if not np.isfinite(value) else f"{value:{width}.{digits}f}"


def phase_time(side_result: Optional[Dict[str, np.ndarray]], phase: str, position: int) -> float:
    """First call (position 0) or median (1) of a phase; ``total`` sums the phases; NaN when missing."""
    if side_result is None:
        return float("nan")
    if phase == "total":
        return float(sum(side_result[f"time_{name}"][position] for name in PHASES))
    return float(side_result[f"time_{phase}"][position])


def report_timings(results: Results, summary: Dict[str, list]) -> None:
    """Timing rows: every task against every one of its peers."""
    print("\nTimings (s): first call (fresh process, tracing included) and median of the repeats after it")
    print(f"{'task':8s} {'peer':7s} {'phase':5s} {'ours 1st':>9s} {'ours med':>9s} {'peer 1st':>9s} "
          f"{'peer med':>9s} {'ours/peer':>9s}")
    for task, sides in results.items():
        for peer_name in [peer for peer in PEERS[task] if peer in sides]:
            for phase in PHASES + ("total",):
                row = [phase_time(sides.get("ours"), phase, 0), phase_time(sides.get("ours"), phase, 1),
                       phase_time(sides.get(peer_name), phase, 0), phase_time(sides.get(peer_name), phase, 1)]
                ratio = row[1] / row[3] if np.isfinite(row[1]) and np.isfinite(row[3]) and row[3] > 0 else float("nan")
                print(f"{task:8s} {peer_name:7s} {phase:5s} " + " ".join(fmt(value, 9) for value in row) + " "
                      + fmt(ratio, 9, 2))
                summary["timings"].append({"task": task, "peer": peer_name, "phase": phase, "ours_first": row[0],
                                           "ours_median": row[1], "peer_first": row[2], "peer_median": row[3],
                                           "ratio": ratio})


def report_memory(results: Results, summary: Dict[str, list]) -> None:
    """Peak RSS of every worker."""
    print("\nPeak RSS (MiB, ru_maxrss of the worker process, importing TensorFlow or torch included)")
    for task, sides in results.items():
        cells = []
        for side_name, side in sides.items():
            rss = float(side["rss_mib"]) if side is not None else float("nan")
            cells.append(f"{side_name} {fmt(rss, 7, 0)}")
            summary["memory"].append({"task": task, "side": side_name, "rss_mib": rss})
        print(f"{task:8s} " + "   ".join(cells))


def comparisons(task: str, sides: Dict[str, Optional[Dict[str, np.ndarray]]],
                exact: Optional[Dict[str, np.ndarray]]) -> List[Tuple[str, float, Dict, float, Dict]]:
    """``(label, sign_left, left, sign_right, right)`` for every comparison of a task."""
    ours = sides.get("ours")
    pairs = [(f"ours vs {peer}", 1.0, ours, PEER_SIGN[peer], sides[peer])
             for peer in PEERS[task] if ours is not None and sides.get(peer) is not None]
    if task in ("cg", "arnoldi") and exact is not None:
        pairs += [(f"{name} vs ours exact", PEER_SIGN.get(name, 1.0), side, 1.0, exact)
                  for name, side in sides.items() if side is not None]
    return pairs


def report_agreement(results: Results, summary: Dict[str, list]) -> None:
    """Pearson, Spearman, top-k overlap and max relative difference of every comparison."""
    exact = results.get("exact", {}).get("ours")
    print(f"\nAgreement (peer values times the sign factor {PEER_SIGN}; top-{common.TOP_K}: largest values, "
          "per test row for the pairwise matrix, over the 1,437 values for self-influence)")
    print(f"{'task':8s} {'comparison':22s} {'values':5s} {'pearson':>10s} {'spearman':>10s} {'top10':>6s} "
          f"{'max rel':>9s}")
    for task, sides in results.items():
        for label, sign_left, left, sign_right, right in comparisons(task, sides, exact):
            for values in ("pair", "self"):
                stats = common.agreement(sign_left * left[values], sign_right * right[values])
                print(f"{task:8s} {label:22s} {values:5s} {stats['pearson']:10.6f} {stats['spearman']:10.6f} "
                      f"{stats['topk']:6.2f} {stats['max_rel']:9.2e}")
                summary["agreement"].append(dict(stats, task=task, comparison=label, values=values))
    if exact is not None and "hessian" in exact:
        print("\nRelative residuals ||(H + λI) x - g|| / ||g|| of the 100 test factors x (each side's inverse-Hessian-"
              "vector products of the test gradients), against our float32 mean Hessian: median, max")
        for task, sides in results.items():
            for side_name, side in sides.items():
                if side is None or "factors" not in side:
                    continue
                med, worst = relative_residuals(exact["hessian"], side["factors"], exact["test_grads"])
                print(f"{task:8s} {side_name:7s} {med:10.2e} {worst:10.2e}")
                summary["residuals"].append({"task": task, "side": side_name, "median": med, "max": worst})


def markdown_table(summary: Dict[str, list]) -> str:
    """The short performance table of the README: per task and peer, the median totals (seconds), the our/peer
    time ratios of the pairwise matrix, the self-influence and the total, the Pearson correlation of our values with
    the peer's and, for the approximate solvers, of each side's pairwise values with our exact ones."""
    timing = {(row["task"], row["peer"], row["phase"]): row for row in summary["timings"]}
    pearson = {(row["task"], row["comparison"], row["values"]): row["pearson"] for row in summary["agreement"]}
    lines = ["| task | peer | ours total (s) | peer total (s) | ours/peer time: pair / self / total | "
             "Pearson ours vs peer: pair / self | Pearson pair vs exact: ours / peer |",
             "|:--|:--|--:|--:|:--:|:--:|:--:|"]
    for (task, peer, phase), row in timing.items():
        if phase != "total":
            continue
        ratios = " / ".join(f"{timing[(task, peer, name)]['ratio']:.2f}" for name in ("pair", "self", "total"))
        agree = " / ".join(f"{pearson.get((task, f'ours vs {peer}', values), float('nan')):.6f}"
                           for values in ("pair", "self"))
        versus_exact = "-"
        if (task, "ours vs ours exact", "pair") in pearson:
            versus_exact = " / ".join(f"{pearson[(task, f'{side} vs ours exact', 'pair')]:.6f}"
                                      for side in ("ours", peer))
        lines.append(f"| {task} | {peer} | {row['ours_median']:.3f} | {row['peer_median']:.3f} | {ratios} | {agree} | "
                     f"{versus_exact} |")
    return "\n".join(lines) + "\n"


def report(results: Results) -> Dict[str, list]:
    """Print the timing, memory, agreement and residual tables; return them as a JSON-able dict."""
    summary: Dict[str, list] = {"timings": [], "memory": [], "agreement": [], "residuals": []}
    report_timings(results, summary)
    report_memory(results, summary)
    report_agreement(results, summary)
    return summary


def main() -> int:
    """Parse options, set up, train once, run every task on both sides, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="only create the peer venv (needs PyPI)")
    parser.add_argument("--force-setup", action="store_true", help="recreate the peer venv")
    parser.add_argument("--tasks", nargs="+", choices=tuple(PEERS), default=list(PEERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first one (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per side and task (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cg-rtol", type=float, default=1e-6)
    parser.add_argument("--cg-maxiter", type=int, default=500)
    parser.add_argument("--cg-recycle", type=int, default=-1,
                        help="our CG's recycle_directions: -1 (default) keeps up to P directions, 0 disables")
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--krylov", type=int, default=101)
    parser.add_argument("--no-captum-exact", action="store_true", help="skip Captum's NaiveInfluenceFunction")
    parser.add_argument("--max-rss-gb", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, help="keep the problem and result files here")
    parser.add_argument("--json", type=Path, help="also write the tables as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the README's short table (Markdown) here")
    args = parser.parse_args()
    args.max_rss_mib = args.max_rss_gb * 1024.0
    setup_peers(force=args.force_setup)
    if args.setup:
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = args.workdir or Path(scratch)
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.problem = args.workdir / "problem.npz"
        print("training the MLP 64-32-10 with Keras 3 (ours env) ...", flush=True)
        trained = subprocess.run([sys.executable, str(BENCH_DIR / "peers" / "run_ours.py"), "--train",
                                  str(args.problem), "--seed", str(args.seed)], env=ours_env(), capture_output=True,
                                 text=True, check=False)
        if trained.returncode != 0:
            print(trained.stdout[-3000:], trained.stderr[-3000:])
            return 1
        print("  " + trained.stdout.strip().splitlines()[-1])
        tasks = sorted(args.tasks, key=list(PEERS).index)
        if "cg" in tasks or "arnoldi" in tasks:
            tasks = ["exact"] + [task for task in tasks if task != "exact"]  # residuals and "vs exact" need it
        results: Results = {}
        for task in tasks:
            peers = [peer for peer in PEERS[task]
                     if not (task == "exact" and peer == "captum" and args.no_captum_exact)]
            outcomes: Dict[str, List[RunOutcome]] = {side: [] for side in ["ours"] + peers}
            for round_index in range(args.rounds):
                order = ["ours"] + peers if round_index % 2 == 0 else peers + ["ours"]
                for side in order:
                    outcomes[side].append(run_side(side, task, args, round_index))
            results[task] = {side: merge_rounds(runs) for side, runs in outcomes.items()}
        summary = report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1, default=float))
    table = markdown_table(summary)
    print("\n" + table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
