"""Fidelity benchmark: the linear datamodeling score (LDS) of every pairwise method, with kronfluence and Captum.

For each model of :mod:`fidelity_problems` (a digits MLP 64-64-64-64-10 and a small CNN on the 8×8 images):

1. train the model (seed 0, checkpoints for TracIn) and retrain it on ``--subsets`` random halves of the training
   set with ``--seeds`` seeds each (cached under ``--cache-dir``, as are the library's scores for the same trained
   weights: a rerun only recomputes what changed, ``--rescore`` recomputes the scores);
2. score the 300 test samples with every pairwise method of the library (influence functions with the exact, CG,
   LiSSA and Arnoldi solvers, the exact solver on the Gauss–Newton matrix and the empirical Fisher, K-FAC and EK-FAC
   with the empirical and the true Fisher; TracIn with the final and with four checkpoints, and projected to
   d = 2,048; TRAK (d = 2,048) on the final checkpoint and over four; RPS-L2; RPS-LJE) and, in the peers' virtual
   environment on the same weights and data, with kronfluence (identity, K-FAC, EK-FAC with the true and the
   empirical Fisher) and Captum's ``TracInCP`` (``peers/run_fidelity.py``), traker's TRAK (final checkpoint and four,
   at traker's λ = 0 and at the library's dampings converted to traker's scale) and Captum's
   ``TracInCPFastRandProj`` (``peers/run_projection.py``);
3. pick each damped method's damping on the first 100 test samples (the validation budget,
   :func:`~deel.influenciae.evaluation.select_damping`; the library's solvers are re-damped with
   ``with_regularization``, one curvature fit per method), and report the LDS on the other 200 test samples at the
   method's default damping and at the chosen one, with a 95 % bootstrap interval, beside the noise ceiling of the
   retrainings (:func:`~deel.influenciae.evaluation.lds_noise_ceiling`).

Outputs: the table on stdout, ``fidelity.md``/``fidelity.json`` and a bar chart ``fidelity.png`` in
``--output-dir``. Seconds are the wall time of one fit plus the (300, N) score matrix at one damping, on this
machine, in the same run (the peers in their own process).

Usage: ``make bench-fidelity`` or ``.venv/bin/python benchmarks/bench_fidelity.py [--models mlp] [--no-peers]``.
"""
import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
import fidelity_problems as problems  # noqa: E402
from fidelity_methods import METHOD_NAMES, TRAK_DAMPINGS, MethodResult, library_methods  # noqa: E402
from deel.influenciae.evaluation import (lds_noise_ceiling, linear_datamodeling_score,  # noqa: E402
                                         random_subset_masks, retrain_outputs, select_damping)
# pylint: enable=wrong-import-position

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
PEER_DAMPINGS = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
BOOTSTRAP = 1000
PEER_LABELS = {"identity": "kronfluence identity", "kfac": "kronfluence K-FAC",
               "kfac_empirical": "kronfluence K-FAC, empirical Fisher", "ekfac": "kronfluence EK-FAC",
               "ekfac_empirical": "kronfluence EK-FAC, empirical Fisher",
               "captum_tracin_final": "Captum TracInCP, final checkpoint",
               "captum_tracin_all": "Captum TracInCP, 4 checkpoints"}


def retrained(problem: problems.FidelityProblem, trainer: problems.FastTrainer, masks: np.ndarray,
              seeds: Sequence[int], cache_dir: Path) -> np.ndarray:
    """(S, M, 300) outputs of the retrained models (cached per subset and seed)."""
    train_set = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train))
    return retrain_outputs(trainer.train_on_subset, train_set, masks, trainer.test_outputs, seeds=tuple(seeds),
                           cache_dir=cache_dir / f"{problem.name}_m{len(masks)}", verbose=True)


def write_peer_problem(path: Path, problem: problems.FidelityProblem, checkpoints: List[List[np.ndarray]],
                       logits_test: np.ndarray) -> None:
    """The problem file of ``peers/run_fidelity.py`` (integer labels, Keras weights of every checkpoint)."""
    arrays = {"model_kind": np.asarray(problem.name), "hidden_units": np.asarray([64, 64, 64], np.int64),
              "x_train": problem.x_train, "y_train": problem.y_train.argmax(1).astype(np.int64),
              "x_test": problem.x_test, "y_test": problem.y_test.argmax(1).astype(np.int64),
              "logits_test": logits_test.astype(np.float32),
              "learning_rates": np.full(len(checkpoints), problems.LEARNING_RATE, np.float64)}
    for index, weights in enumerate(checkpoints):
        arrays.update({f"ckpt{index}_w{position}": weight for position, weight in enumerate(weights)})
    np.savez(path, **arrays)


def run_peer_worker(script: str, problem_path: Path, output_path: Path,
                    options: Sequence[str]) -> Optional[Dict[str, np.ndarray]]:
    """Run a worker of ``peers/`` in the peers' virtual environment; its arrays, or None (reported) if it failed."""
    command = [str(PEER_PYTHON), str(HERE / "peers" / script), "--problem", str(problem_path), "--output",
               str(output_path), *options]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        print(f"  peer worker {script} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        return None
    with np.load(output_path) as archive:
        return {key: archive[key] for key in archive.files}


def peer_result(arrays: Dict[str, np.ndarray], strategy: str, label: str) -> MethodResult:
    """One strategy of a peer worker's arrays: ``scores__<strategy>[__<damping>]`` (damping suffix ``heuristic`` or
    ``own``: the peer's own default, key None) with their ``seconds__`` (fit + scores at that damping)."""
    scores: Dict[Optional[float], np.ndarray] = {}
    suffixes: Dict[Optional[float], str] = {}
    for key, value in arrays.items():
        parts = key.split("__")
        if parts[0] != "scores" or parts[1] != strategy:
            continue
        suffix = parts[2] if len(parts) == 3 else "heuristic"
        if strategy == "identity" and suffix != "heuristic":
            continue  # kronfluence's identity ignores the damping: one matrix
        damping = None if suffix in ("heuristic", "own") else float(suffix)
        scores[damping], suffixes[damping] = value, suffix
    seconds = {}
    for damping, suffix in suffixes.items():
        key = f"seconds__{strategy}__{suffix}" if f"seconds__{strategy}__{suffix}" in arrays else f"seconds__{strategy}"
        seconds[damping] = float(arrays.get(key, np.nan))  # the worker's fit + scores at that damping
    return MethodResult(label, scores, None, 0.0, seconds)


def peer_methods(problem: problems.FidelityProblem, checkpoints: List[List[np.ndarray]],
                 logits_test: np.ndarray) -> List[MethodResult]:
    """kronfluence and Captum (``peers/run_fidelity.py``), traker and Captum's fast TracIn (``peers/run_projection.py``)
    scores from the peers' virtual environment (empty when it is missing)."""
    if not PEER_PYTHON.exists():
        print(f"  (no peer venv at {PEER_PYTHON}: run `.venv/bin/python benchmarks/bench_peers.py --setup`)")
        return []
    with tempfile.TemporaryDirectory() as folder:
        problem_path = Path(folder) / "problem.npz"
        write_peer_problem(problem_path, problem, checkpoints, logits_test)
        fidelity = run_peer_worker("run_fidelity.py", problem_path, Path(folder) / "scores.npz",
                                   ["--dampings", ",".join(f"{d:g}" for d in PEER_DAMPINGS)])
        # Captum's exact TracInCP is already in run_fidelity.py's results.
        projection = run_peer_worker("run_projection.py", problem_path, Path(folder) / "projection.npz",
                                     ["--dampings", ",".join(f"{d:g}" for d in TRAK_DAMPINGS), "--no-captum-exact"])
    results = []
    if fidelity is not None:
        strategies = sorted({key.split("__")[1] for key in fidelity if key.startswith("scores__")},
                            key=lambda strategy: list(PEER_LABELS).index(strategy) if strategy in PEER_LABELS else 99)
        results += [peer_result(fidelity, strategy, PEER_LABELS.get(strategy, strategy)) for strategy in strategies]
    if projection is not None:
        results += [peer_result(projection, key.split("__", 1)[1], str(value))
                    for key, value in projection.items() if key.startswith("label__")]
    return results


def cached_library_methods(problem: problems.FidelityProblem, model: keras.Model,
                           checkpoints: List[List[np.ndarray]], args: argparse.Namespace) -> List[MethodResult]:
    """The library's scores, method by method, reused from ``--cache-dir`` when the trained weights are the same
    (``--rescore`` recomputes them)."""
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for c in checkpoints for w in c)).hexdigest()
    results = []
    for method in args.methods or METHOD_NAMES:
        path = args.cache_dir / f"{problem.name}_scores_{digest[:16]}_{method}.pkl"
        if path.exists() and not args.rescore:
            print(f"  {method}: scores reused from {path.name} (--rescore recomputes them)", flush=True)
            with open(path, "rb") as stream:
                results.extend(pickle.load(stream))
            continue
        computed = library_methods(problem, model, checkpoints, only=[method])
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as stream:
            pickle.dump(computed, stream)
        results.extend(computed)
    return results


def evaluate(result: MethodResult, masks: np.ndarray, outputs: np.ndarray) -> Dict[str, object]:
    """LDS on the report samples at the default damping and at the damping chosen on the validation samples
    (:func:`select_damping` over the numeric candidates; a peer's own default competes on the same samples)."""
    validation, report = slice(0, problems.N_VALIDATION), slice(problems.N_VALIDATION, None)

    def lds(scores: np.ndarray) -> Dict[str, object]:
        value = linear_datamodeling_score(scores[report], masks, outputs[:, report], bootstrap=BOOTSTRAP)
        return {"lds": value.score, "interval": value.confidence_interval}

    row: Dict[str, object] = {"method": result.name, "default_damping": result.default,
                              "failures": {str(key): value for key, value in result.failures.items()}}
    row["at_default"] = lds(result.scores[result.default]) if result.default in result.scores else None
    numeric = sorted(damping for damping in result.scores if damping is not None)
    best: Optional[float] = result.default
    if numeric:
        selection = select_damping(lambda damping: result.scores[damping][validation], numeric, masks=masks,
                                   outputs=outputs[:, validation])
        row["validation"] = {f"{damping:g}": value for damping, value in zip(numeric, selection.values.tolist())}
        best = selection.best
        if None in result.scores:
            own = linear_datamodeling_score(result.scores[None][validation], masks, outputs[:, validation]).score
            row["validation"]["default"] = own
            best = None if own >= selection.best_value else best
    row["best_damping"] = best
    row["at_best"] = lds(result.scores[best]) if best in result.scores else None
    row["seconds"] = result.seconds(best)
    row["seconds_at_default"] = result.seconds(result.default)
    return row


def format_lds(entry: Optional[Dict[str, object]]) -> str:
    """``0.391 [0.36, 0.42]``, or ``-`` when there is nothing."""
    if not entry:
        return "-"
    low, high = entry["interval"]
    return f"{entry['lds']:.3f} [{low:.2f}, {high:.2f}]"


def format_damping(damping: Optional[float]) -> str:
    """``1e-03``; ``own`` for a peer's own default (kronfluence's heuristic)."""
    return "own" if damping is None else ("0" if damping == 0 else f"{damping:.0e}")


def table(rows: List[Dict[str, object]], ceiling: float, title: str, epoch_seconds: float) -> str:
    """The markdown table of one model (seconds also as a ratio to one plain training epoch of the same run)."""
    lines = [f"**{title}**; noise ceiling of the retrainings: {ceiling:.3f}", "",
             "| method | default λ | LDS at default λ | λ chosen on validation | LDS at chosen λ [95 % CI] "
             "| seconds at chosen λ | × one training epoch |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        damped = bool(row.get("validation")) or row["default_damping"] is not None
        default = format_damping(row["default_damping"]) if damped else "-"
        chosen = format_damping(row["best_damping"]) if damped else "-"
        at_default = format_lds(row["at_default"]) if row["at_default"] else "not run"
        lines.append(f"| {row['method']} | {default} | {at_default} | {chosen} | {format_lds(row['at_best'])} | "
                     f"{row['seconds']:.1f} | {row['seconds'] / epoch_seconds:.0f} |")
    return "\n".join(lines)


def bar_chart(results: Dict[str, Dict[str, object]], path: Path) -> None:
    """Horizontal bars of the LDS at the chosen damping, one panel per model, the noise ceiling dashed."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    figure, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for axis, result in zip(axes[0], results.values()):
        rows = result["rows"]
        values = [row["at_best"]["lds"] if row["at_best"] else np.nan for row in rows]
        colors = ["tab:orange" if row["method"].startswith(("kronfluence", "Captum", "traker")) else "tab:blue"
                  for row in rows]
        positions = np.arange(len(rows))
        axis.barh(positions, values, color=colors)
        axis.set_yticks(positions, [row["method"] for row in rows])
        axis.invert_yaxis()
        axis.axvline(result["ceiling"], color="black", linestyle="--", label="noise ceiling")
        axis.set_xlabel("LDS at the chosen damping (200 test samples)")
        axis.set_title(result["title"], fontsize=9)
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_problem(name: str, args: argparse.Namespace) -> Dict[str, object]:
    """Train, retrain, score and evaluate one model."""
    keras.utils.set_random_seed(0)
    problem = problems.load_problem(name)
    print(f"\n== {problem.description}", flush=True)
    trainer = problems.FastTrainer(problem)
    start = time.perf_counter()
    model, checkpoints = trainer.train(problem.x_train, problem.y_train, seed=0,
                                       checkpoint_epochs=problems.CHECKPOINT_EPOCHS)
    epoch_seconds = (time.perf_counter() - start) / problems.EPOCHS
    accuracy = float(np.mean(np.argmax(model(problem.x_test), 1) == problem.y_test.argmax(1)))
    print(f"  trained: test accuracy {accuracy:.3f}, {epoch_seconds * 1000:.0f} ms per epoch", flush=True)
    masks = random_subset_masks(len(problem.x_train), args.subsets, fraction=0.5, seed=0)
    start = time.perf_counter()
    per_seed = retrained(problem, trainer, masks, range(args.seeds), args.cache_dir)
    print(f"  retrainings: {per_seed.shape[0]} seeds x {per_seed.shape[1]} subsets "
          f"({time.perf_counter() - start:.0f} s, cached in {args.cache_dir})", flush=True)
    ceiling = lds_noise_ceiling(per_seed[:, :, problems.N_VALIDATION:])
    outputs = per_seed.mean(axis=0)
    final_weights = checkpoints[-1]
    model.set_weights(final_weights)
    logits_test = np.asarray(model(problem.x_test))
    results = cached_library_methods(problem, model, checkpoints, args)
    if args.peers:
        results += peer_methods(problem, checkpoints, logits_test)
    rows = [evaluate(result, masks, outputs) for result in results]
    title = problem.description + f"; {args.subsets} subsets of 50 % x {args.seeds} seeds"
    print(table(rows, ceiling.ceiling, title, epoch_seconds), flush=True)
    return {"title": title, "rows": rows, "ceiling": ceiling.ceiling,
            "seed_pair_correlation": ceiling.seed_pair_correlation, "test_accuracy": accuracy,
            "epoch_seconds": epoch_seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the library's methods")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--rescore", action="store_true", help="recompute the library's scores even if cached")
    parser.add_argument("--cache-dir", type=Path, default=HERE / "results" / "fidelity_cache")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.methods = None if args.methods is None else args.methods.split(",")
    results = {name: run_problem(name, args) for name in args.models.split(",")}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join(table(result["rows"], result["ceiling"], result["title"], result["epoch_seconds"])
                           for result in results.values())
    (args.output_dir / "fidelity.md").write_text(markdown + "\n")
    (args.output_dir / "fidelity.json").write_text(json.dumps(results, indent=1, default=float))
    bar_chart(results, args.output_dir / "fidelity.png")
    print(f"\nwrote {args.output_dir / 'fidelity.md'}, fidelity.json, fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
