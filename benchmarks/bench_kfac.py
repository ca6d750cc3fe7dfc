"""K-FAC / EK-FAC side by side with kronfluence 1.0.1: agreement of the pairwise scores, and fit + score seconds.

For the two models of the fidelity benchmark (:mod:`fidelity_problems`: the digits MLP 64-64-64-64-10 and the small
CNN), trained exactly as ``bench_fidelity.py`` trains its full-data model (seed 0, same code path), this script
computes the (T, N) pairwise scores ``g(t)ᵀ (F + λI)⁻¹ g(z)`` of T test samples (the report samples of the fidelity
benchmark, ``x_test[100:100 + T]``) against the N = 1,497 training samples with this library's
:class:`~deel.influenciae.common.KFACIHVP` / :class:`~deel.influenciae.common.EKFACIHVP` and
:class:`~deel.influenciae.influence.FirstOrderInfluenceCalculator`, and with kronfluence (its torch twin of the model
with the same weights and data, in ``benchmarks/.venv-peers``, worker ``peers/run_kfac.py``), for

* K-FAC and EK-FAC × the empirical and the true Fisher (kronfluence's ``kfac_empirical`` … ``ekfac``);
* K-FAC's conv blocks with kronfluence's convention (``position_scaling="mean"``) and, on the CNN, also with the
  library's default (``"sum"``, Grosse & Martens' KFC: the conv blocks |T| times larger, so not kronfluence's
  matrix);
* the dampings: kronfluence's heuristic (``damping_factor=None``; ours ``damping_heuristic=0.1``, regularization 0),
  ``--dampings`` (default 1e-3), and the λ the fidelity benchmark chose for the matching method of either library
  when ``--fidelity-json`` (default ``results/fidelity.json``) has it.

Agreement (on the float32 run that is timed): Pearson over all T·N pairs, the median of the per-test-row Pearson,
Spearman over all pairs, and the least-squares scale ``kronfluence ≈ c · ours``. The true Fisher draws its labels
with different random generators in the two libraries, so its agreement is bounded by the Monte-Carlo noise: the
script also compares each library with itself under another seed, and both libraries with the Fisher averaged over
``--fisher-repeats`` label draws per sample (the fit on the training set repeated; untimed). ``--float64`` adds the
agreement of float64 runs of both sides (untimed).

Timing (``time.perf_counter``, float32 on both sides: kronfluence's defaults, 2 torch threads by default, our
TensorFlow default threads): for every configuration and damping, the fit (every pass over the data and the
eigendecompositions) plus the (T, N) score matrix at that damping, both computed from scratch by a new solver
(ours: ``KFACIHVP(...)``, ``with_regularization`` and a new calculator, the solver's tracing included, as every user
pays it; kronfluence: ``fit_all_factors`` and ``compute_pairwise_scores``, its disk round-trips included). One
untimed warm-up per process is excluded on both sides (ours: a full fit and score matrix before the first round;
kronfluence: ``--warmup``, its first strategy once). ``--repeats`` rounds alternate the two sides (ours, then a fresh
kronfluence process); the tables give the median over rounds and the smallest. NumPy's BLAS is single-threaded
(``OPENBLAS_NUM_THREADS=1`` unless set: it only runs our small eigendecompositions, see the profile).

Profile (ours, K-FAC and EK-FAC with the empirical Fisher at λ = 1e-3): each fit stage and the score matrix run
cold (a new solver: its tf.function tracing included) and warm (rerun with the traced functions), with the number
of traces, and the eigendecomposition stage with NumPy's BLAS at 1 and at 2 threads.

Outputs: the tables on stdout, ``kfac.md`` and ``kfac.json`` in ``--output-dir`` (``--tag`` suffixes the names).

Usage: ``make bench-kfac`` or ``.venv/bin/python benchmarks/bench_kfac.py [--models mlp,cnn] [--repeats 3]
[--batch-size 256] [--float64]``.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import scipy.stats  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
import threadpoolctl  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position,wrong-import-order
import fidelity_problems as problems  # noqa: E402
from bench_fidelity import PEER_LABELS, write_peer_problem  # noqa: E402
from fidelity_methods import KRONECKER_METHODS  # noqa: E402
from deel.influenciae.common import EKFACIHVP, InfluenceModel, KFACIHVP, kfac_ihvp, kronecker_blocks  # noqa: E402
from deel.influenciae.influence import FirstOrderInfluenceCalculator  # noqa: E402
# pylint: enable=wrong-import-position,wrong-import-order

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
PEER_WORKER = HERE / "peers" / "run_kfac.py"
SOLVERS = {"kfac": KFACIHVP, "ekfac": EKFACIHVP}
HEURISTIC_SCALE = 0.1  # kronfluence's HEURISTIC_DAMPING_SCALE
HEURISTIC = "heuristic"
PEARSON_TARGET = 0.99
SPEED_TARGET = 3.0

Damping = Optional[float]  # None: kronfluence's heuristic
Scores = Dict[str, np.ndarray]  # damping name -> (T, N)


@dataclasses.dataclass(frozen=True)
class Config:
    """One K-FAC / EK-FAC configuration, ours and kronfluence's.

    Attributes
    ----------
    solver
        ``"kfac"`` or ``"ekfac"``.
    fisher
        ``"empirical"`` or ``"true"``.
    scaling
        Our ``position_scaling`` (``"mean"``: kronfluence's convention; only conv blocks differ).
    """

    solver: str
    fisher: str
    scaling: str

    @property
    def key(self) -> str:
        """``kfac_empirical_mean`` …"""
        return f"{self.solver}_{self.fisher}_{self.scaling}"

    @property
    def peer(self) -> str:
        """kronfluence's method name in ``run_fidelity.STRATEGIES``."""
        return self.solver + ("_empirical" if self.fisher == "empirical" else "")

    @property
    def fidelity_method(self) -> str:
        """The matching method of ``fidelity_methods.KRONECKER_METHODS``."""
        return self.solver + ("_true" if self.fisher == "true" else "")

    def label(self, convolutional: bool) -> str:
        """Row label; the scaling is named where it matters (K-FAC on a model with convolutions)."""
        text = f"{'K-FAC' if self.solver == 'kfac' else 'EK-FAC'}, {self.fisher} Fisher"
        if convolutional and self.solver == "kfac":
            text += ", conv S " + ("averaged over positions (kronfluence's)" if self.scaling == "mean" else
                                   "summed over positions (library default)")
        return text


def configurations(name: str) -> List[Config]:
    """The configurations of a model: K-FAC with kronfluence's conv convention, EK-FAC, and on the CNN K-FAC with
    the library's default scaling too."""
    configs = [Config("kfac", "empirical", "mean"), Config("kfac", "true", "mean"),
               Config("ekfac", "empirical", "sum"), Config("ekfac", "true", "sum")]
    if name == "cnn":
        configs += [Config("kfac", "empirical", "sum"), Config("kfac", "true", "sum")]
    return configs


def matches_peer(config: Config) -> bool:
    """Whether the configuration is kronfluence's matrix (EK-FAC, or K-FAC with conv S averaged over positions)."""
    return config.solver == "ekfac" or config.scaling == "mean"


def damping_name(damping: Damping) -> str:
    """``heuristic`` or ``f"{λ:.0e}"`` (the names of ``peers/run_fidelity.py``)."""
    return HEURISTIC if damping is None else f"{damping:.0e}"


def fidelity_dampings(path: Path, name: str) -> Dict[str, float]:
    """λ chosen by the fidelity benchmark for the Kronecker-factored methods of both libraries on model ``name``:
    ``{row label: λ}`` (empty when the file or the model is missing)."""
    if not path.exists():
        return {}
    results = json.loads(path.read_text()).get(name)
    if not results:
        return {}
    wanted = {label for _, _, label in KRONECKER_METHODS.values()}
    wanted |= {label for key, label in PEER_LABELS.items() if "fac" in key}
    return {row["method"]: float(row["best_damping"]) for row in results["rows"]
            if row["method"] in wanted and isinstance(row.get("best_damping"), (int, float))}


# -------- Agreement -----------------------------------------------------------------------------------------------
def agreement(ours: np.ndarray, theirs: np.ndarray) -> Dict[str, float]:
    """Pearson (all pairs), median per-row Pearson, Spearman (all pairs), least-squares scale ``theirs ≈ c·ours``."""
    a, b = ours.astype(np.float64), theirs.astype(np.float64)
    centred_a, centred_b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    rows = np.sum(centred_a * centred_b, 1) / np.sqrt(np.sum(centred_a ** 2, 1) * np.sum(centred_b ** 2, 1))
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), "row_pearson_median": float(np.median(rows)),
            "row_pearson_min": float(rows.min()),
            "spearman": float(scipy.stats.spearmanr(a.ravel(), b.ravel())[0]),
            "scale": float(np.sum(a * b) / np.sum(a * a))}


# -------- Our side ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Side:
    """What one side computed for one configuration: scores per damping (first round) and seconds per round."""

    scores: Scores = dataclasses.field(default_factory=dict)
    fit_seconds: List[float] = dataclasses.field(default_factory=list)
    score_seconds: Dict[str, List[float]] = dataclasses.field(default_factory=dict)

    def totals(self, damping: str) -> List[float]:
        """Fit + scores at ``damping``, per round."""
        return [fit + score for fit, score in zip(self.fit_seconds, self.score_seconds.get(damping, []))]


def heuristic_twin(solver: KFACIHVP) -> KFACIHVP:
    """The fitted solver with kronfluence's heuristic damping (per block ``0.1 · mean(Λ)``, regularization 0), no
    refit: ``with_regularization`` keeps ``damping_heuristic``, so it is set on a copy first."""
    twin = copy.copy(solver)
    twin.damping_heuristic = HEURISTIC_SCALE
    return twin.with_regularization(0.0)


@dataclasses.dataclass
class Problem:
    """A trained model with its influence model and datasets.

    Attributes
    ----------
    name
        ``mlp`` or ``cnn``.
    influence_model
        Every layer watched, the cross-entropy per sample.
    train, test
        Batched training set (``--batch-size``) and the T test samples (one batch).
    problem
        The fidelity problem (data, builder), with the T test samples.
    weights
        The trained weights (Keras ``get_weights``).
    description
        Architecture and sizes (the fidelity benchmark's line).
    """

    name: str
    influence_model: InfluenceModel
    train: tf.data.Dataset
    test: tf.data.Dataset
    problem: problems.FidelityProblem
    weights: List[np.ndarray]
    description: str


def run_ours(setup: Problem, config: Config, dampings: Sequence[Damping], seed: int = 0,
             fisher_repeats: int = 1) -> Tuple[float, Dict[str, Tuple[np.ndarray, float]]]:
    """One fit (timed), then the (T, N) scores at every damping (each timed: re-damping, calculator, matrix).

    Returns
    -------
    tuple
        The fit's seconds and ``{damping name: ((T, N) float64 scores, seconds)}``.
    """
    fit_set = setup.train if fisher_repeats == 1 else setup.train.repeat(fisher_repeats)
    numeric = [damping for damping in dampings if damping is not None]
    start = time.perf_counter()
    solver = SOLVERS[config.solver](setup.influence_model, fit_set, regularization=numeric[0] if numeric else 0.0,
                                    fisher=config.fisher, seed=seed, position_scaling=config.scaling)
    fit_seconds = time.perf_counter() - start
    results = {}
    for damping in dampings:
        start = time.perf_counter()
        twin = heuristic_twin(solver) if damping is None else solver.with_regularization(damping)
        calculator = FirstOrderInfluenceCalculator(setup.influence_model, setup.train, ihvp_calculator=twin)
        scores = np.asarray(calculator.influence_matrix(setup.test, setup.train), np.float64)
        results[damping_name(damping)] = (scores, time.perf_counter() - start)
    return fit_seconds, results


def check_heuristic_twin(setup: Problem, config: Config, scores: np.ndarray) -> float:
    """Max relative difference between the heuristic twin's scores and a solver fitted with
    ``damping_heuristic=0.1`` (untimed)."""
    solver = SOLVERS[config.solver](setup.influence_model, setup.train, regularization=0.0, fisher=config.fisher,
                                    seed=0, position_scaling=config.scaling, damping_heuristic=HEURISTIC_SCALE)
    fresh = np.asarray(FirstOrderInfluenceCalculator(setup.influence_model, setup.train, ihvp_calculator=solver)
                       .influence_matrix(setup.test, setup.train), np.float64)
    return float(np.abs(fresh - scores).max() / np.abs(fresh).max())


# -------- kronfluence's side --------------------------------------------------------------------------------------
def run_peer(problem_path: Path, configs: Sequence[Config], dampings: Sequence[Damping], args: argparse.Namespace,
             seed: int = 0, warmup: bool = True, fisher_repeats: int = 1,
             dtype: str = "float32") -> Dict[str, np.ndarray]:
    """kronfluence's scores and seconds for the configurations' strategies (one worker process)."""
    methods = list(dict.fromkeys(config.peer for config in configs))
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "peer.npz"
        command = [str(PEER_PYTHON), str(PEER_WORKER), "--problem", str(problem_path), "--output", str(output),
                   "--strategies", ",".join(methods),
                   "--dampings", ",".join(f"{damping:g}" for damping in dampings if damping is not None),
                   "--dtype", dtype, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--seed", str(seed), "--fisher-repeats", str(fisher_repeats)] + (["--warmup"] if warmup else [])
        environment = dict(os.environ)
        environment.pop("OPENBLAS_NUM_THREADS", None)  # torch uses MKL; its own threads are --threads
        completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        for line in completed.stdout.splitlines():
            print(f"    {line}", flush=True)
        if completed.returncode != 0:
            raise RuntimeError(f"peer worker failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        with np.load(output) as archive:
            return {key: archive[key] for key in archive.files}


def add_peer_round(sides: Dict[str, Side], arrays: Dict[str, np.ndarray], configs: Sequence[Config],
                   keep_scores: bool) -> None:
    """Record one kronfluence process's seconds (and, for the first round, its scores) per configuration."""
    for config in configs:
        side = sides.setdefault(config.key, Side())
        side.fit_seconds.append(float(arrays[f"fit_seconds__{config.peer}"]))
        for key, value in arrays.items():
            prefix = f"score_seconds__{config.peer}__"
            if key.startswith(prefix):
                side.score_seconds.setdefault(key[len(prefix):], []).append(float(value))
            prefix = f"scores__{config.peer}__"
            if keep_scores and key.startswith(prefix):
                side.scores[key[len(prefix):]] = value


def peer_scores(arrays: Dict[str, np.ndarray], config: Config) -> Scores:
    """``{damping name: (T, N)}`` of one configuration in a worker's output."""
    prefix = f"scores__{config.peer}__"
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


# -------- Setup ---------------------------------------------------------------------------------------------------
def trained_problem(name: str, args: argparse.Namespace) -> Tuple[Problem, str]:
    """The fidelity benchmark's full-data model (same seed and code path as ``bench_fidelity.run_problem``), and the
    digest of its checkpoints (the key of the fidelity benchmark's score cache)."""
    keras.utils.set_random_seed(0)
    problem = problems.load_problem(name)
    model, checkpoints = problems.FastTrainer(problem).train(problem.x_train, problem.y_train, seed=0,
                                                             checkpoint_epochs=problems.CHECKPOINT_EPOCHS)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for c in checkpoints for w in c)).hexdigest()
    model.set_weights(checkpoints[-1])
    description = problem.description.split(", digits")[0] + f", digits: {len(problem.x_train):,} train"
    rows = slice(problems.N_VALIDATION, problems.N_VALIDATION + args.test_samples)
    problem = dataclasses.replace(problem, x_test=problem.x_test[rows], y_test=problem.y_test[rows])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train)).batch(args.batch_size)
    test = tf.data.Dataset.from_tensor_slices((problem.x_test, problem.y_test)).batch(len(problem.x_test))
    return Problem(name, influence_model, train, test, problem, checkpoints[-1], description), digest[:16]


def float64_problem(setup: Problem, batch_size: int) -> Problem:
    """The same model, weights and data in float64 (Keras' floatx and dtype policy set while building)."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = setup.problem.build(0)
        model.set_weights(setup.weights)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")
        influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])
    cast = dataclasses.replace(setup.problem, x_train=setup.problem.x_train.astype(np.float64),
                               y_train=setup.problem.y_train.astype(np.float64),
                               x_test=setup.problem.x_test.astype(np.float64),
                               y_test=setup.problem.y_test.astype(np.float64))
    train = tf.data.Dataset.from_tensor_slices((cast.x_train, cast.y_train)).batch(batch_size)
    test = tf.data.Dataset.from_tensor_slices((cast.x_test, cast.y_test)).batch(len(cast.x_test))
    return Problem(setup.name, influence_model, train, test, cast, setup.weights, setup.description)


# -------- Profile -------------------------------------------------------------------------------------------------
def timed(function: Callable[[], Any]) -> Tuple[float, Any]:
    """``(seconds, result)``."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def profile(setup: Problem, config: Config, damping: float) -> Dict[str, Any]:
    """Cold (new solver: tracing included) and warm (traced functions reused) seconds of each fit stage and of the
    score matrix, the number of traces of the data passes, and the eigendecompositions at 1 and 2 BLAS threads."""
    # pylint: disable=protected-access
    solver = SOLVERS[config.solver](setup.influence_model, setup.train, regularization=damping,
                                    fisher=config.fisher, position_scaling=config.scaling, fit_now=False)
    rows: Dict[str, Any] = {}
    seconds, blocks = timed(lambda: (solver._ensure_structure(), solver.memory_estimate())[0].blocks)
    rows["structure and memory estimate"] = {"cold": seconds}
    stages = [("covariances", solver._fit_covariances, "covariances"),
              ("eigendecompositions", solver._fit_eigendecompositions, None)]
    if solver.corrected:
        stages.append(("corrected eigenvalues", solver._fit_corrected_eigenvalues, "corrected"))
    for label, method, compiled in stages:
        cold, _ = timed(lambda method=method: method(blocks))
        warm, _ = timed(lambda method=method: method(blocks))
        rows[label] = {"cold": cold, "warm": warm}
        if compiled is not None:
            rows[label]["traces"] = int(solver._compiled[compiled].experimental_get_tracing_count())
        else:
            with threadpoolctl.threadpool_limits(2, user_api="blas"):
                rows[label]["warm, 2 BLAS threads"] = min(timed(lambda method=method: method(blocks))[0]
                                                          for _ in range(3))
    solver._prepare()
    solver._fitted = True
    twin = solver.with_regularization(damping)
    calculator = FirstOrderInfluenceCalculator(setup.influence_model, setup.train, ihvp_calculator=twin)
    cold, _ = timed(lambda: calculator.influence_matrix(setup.test, setup.train))
    warm, _ = timed(lambda: calculator.influence_matrix(setup.test, setup.train))
    rows["score matrix"] = {"cold": cold, "warm": warm}
    test_gradients = tf.concat([setup.influence_model.batch_jacobian_tensor(batch) for batch in setup.test], 0)
    fresh = solver.with_regularization(damping)
    cold, _ = timed(lambda: fresh.solve(tf.transpose(test_gradients)))
    warm, _ = timed(lambda: fresh.solve(tf.transpose(test_gradients)))
    rows["  of which the solve of the test side"] = {"cold": cold, "warm": warm}
    warm, _ = timed(lambda: [setup.influence_model.batch_jacobian_tensor(batch) for batch in setup.train])
    rows["  of which the training gradients"] = {"warm": warm}
    return rows


# -------- Report --------------------------------------------------------------------------------------------------
def seconds_summary(values: Sequence[float]) -> Dict[str, float]:
    """Median and minimum over rounds."""
    return {"median": float(np.median(values)), "min": float(np.min(values))} if values else {}


def evaluate(name: str, configs: Sequence[Config], dampings: Sequence[Damping], ours: Dict[str, Side],
             theirs: Dict[str, Side]) -> List[Dict[str, Any]]:
    """One row per configuration and damping: agreement and seconds."""
    rows = []
    for config in configs:
        for damping in dampings:
            key = damping_name(damping)
            mine, peer = ours[config.key], theirs[config.key]
            ours_seconds, peer_seconds = seconds_summary(mine.totals(key)), seconds_summary(peer.totals(key))
            rows.append({"configuration": config.label(name == "cnn"), "key": config.key, "scaling": config.scaling,
                         "fisher": config.fisher, "solver": config.solver, "damping": key,
                         **agreement(mine.scores[key], peer.scores[key]),
                         "ours_seconds": ours_seconds, "kronfluence_seconds": peer_seconds,
                         "ours_fit_seconds": seconds_summary(mine.fit_seconds),
                         "kronfluence_fit_seconds": seconds_summary(peer.fit_seconds),
                         "speedup": peer_seconds["median"] / ours_seconds["median"]})
    return rows


def main_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: agreement and seconds per configuration and damping (and the float64 agreement when run)."""
    wide = any("float64" in row for row in rows)
    lines = ["| configuration | λ | Pearson | median row Pearson | Spearman | scale (kronfluence / ours) "
             + ("| Pearson, float64 (median row) " if wide else "")
             + "| ours: fit + scores, s | kronfluence: fit + scores, s | kronfluence / ours (medians) "
             "| kronfluence / ours (minima) |",
             "|---|---|---|---|---|---|" + ("---|" if wide else "") + "---|---|---|---|"]
    for row in rows:
        ours, peer = row["ours_seconds"], row["kronfluence_seconds"]
        double = row.get("float64")
        extra = ""
        if wide:
            extra = f" {double['pearson']:.4f} ({double['row_pearson_median']:.4f}) |" if double else " - |"
        lines.append(f"| {row['configuration']} | {row['damping']} | {row['pearson']:.4f} | "
                     f"{row['row_pearson_median']:.4f} | {row['spearman']:.4f} | {row['scale']:.3f} |{extra} "
                     f"{ours['median']:.2f} [{ours['min']:.2f}] | {peer['median']:.2f} [{peer['min']:.2f}] | "
                     f"{row['speedup']:.1f}× | {peer['min'] / ours['min']:.1f}× |")
    return "\n".join(lines)


def noise_table(rows: Sequence[Dict[str, Any]], repeats: int) -> str:
    """Markdown: the true Fisher's agreement beside each library's agreement with itself under another seed."""
    columns = [("ours vs kronfluence", "cross"), ("ours: seed 0 vs 1", "ours_seeds"),
               ("kronfluence: seed 0 vs 1", "peer_seeds"), (f"ours vs kronfluence, {repeats} draws", "cross_repeats"),
               (f"ours: seed 0 vs 1, {repeats} draws", "ours_seeds_repeats")]
    lines = ["| configuration | λ | " + " | ".join(title for title, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]['pearson']:.4f} ({row[key]['row_pearson_median']:.4f})" if key in row else "-"
                 for _, key in columns]
        lines.append(f"| {row['configuration']} | {row['damping']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(profiles: Dict[str, Dict[str, Any]]) -> str:
    """Markdown: our cold / warm seconds per stage, beside kronfluence's fit and score seconds."""
    lines = ["| configuration | stage | cold s (new solver) | warm s (traced functions reused) | traces |",
             "|---|---|---|---|---|"]
    for label, rows in profiles.items():
        for stage, values in rows["stages"].items():
            warm = f"{values['warm']:.3f}" if "warm" in values else "-"
            if "warm, 2 BLAS threads" in values:
                warm += f" (2 BLAS threads: {values['warm, 2 BLAS threads']:.3f})"
            cold = f"{values['cold']:.3f}" if "cold" in values else "-"
            lines.append(f"| {label} | {stage} | {cold} | {warm} | {values.get('traces', '-')} |")
        peer = rows.get("kronfluence")
        if peer:
            lines.append(f"| {label} | kronfluence: fit / scores, median [min] over rounds | "
                         f"{peer['fit']['median']:.3f} [{peer['fit']['min']:.3f}] / "
                         f"{peer['scores']['median']:.3f} [{peer['scores']['min']:.3f}] | | |")
    return "\n".join(lines)


# -------- Main ----------------------------------------------------------------------------------------------------
def run_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:  # pylint: disable=too-many-statements
    """Everything for one model: rounds of both sides, the noise comparisons, the profile."""
    setup, digest = trained_problem(name, args)
    configs = configurations(name)
    chosen = fidelity_dampings(args.fidelity_json, name)
    dampings: List[Damping] = [None] + sorted(set(args.dampings) | set(chosen.values()))
    print(f"\n== {setup.description}; T = {args.test_samples}; weights {digest}; "
          f"dampings {[damping_name(d) for d in dampings]}"
          + (f" (fidelity choices: {chosen})" if chosen else ""), flush=True)
    model_logits = np.asarray(setup.influence_model.model(setup.problem.x_test))
    ours: Dict[str, Side] = {}
    theirs: Dict[str, Side] = {}
    with tempfile.TemporaryDirectory() as folder:
        problem_path = Path(folder) / "problem.npz"
        write_peer_problem(problem_path, setup.problem, [setup.weights], model_logits)
        seconds, _ = timed(lambda: run_ours(setup, Config("ekfac", "empirical", "sum"), dampings[:2]))
        print(f"  ours: warm-up (EK-FAC, untimed) {seconds:.2f}s", flush=True)
        for round_index in range(args.repeats):
            for config in configs:
                fit_seconds, results = run_ours(setup, config, dampings)
                side = ours.setdefault(config.key, Side())
                side.fit_seconds.append(fit_seconds)
                for key, (scores, score_seconds) in results.items():
                    side.score_seconds.setdefault(key, []).append(score_seconds)
                    if round_index == 0:
                        side.scores[key] = scores
                print(f"  ours {config.key:22s} fit {fit_seconds:6.2f}s, scores "
                      + " ".join(f"{key} {value:.2f}s" for key, (_, value) in results.items()), flush=True)
            add_peer_round(theirs, run_peer(problem_path, configs, dampings, args), configs, round_index == 0)
        print(f"  heuristic twin vs a solver fitted with damping_heuristic=0.1: max relative difference "
              f"{check_heuristic_twin(setup, configs[0], ours[configs[0].key].scores[HEURISTIC]):.1e}", flush=True)
        rows = evaluate(name, configs, dampings, ours, theirs)
        true_configs = [config for config in configs if config.fisher == "true" and matches_peer(config)]
        peer_seed = run_peer(problem_path, true_configs, dampings, args, seed=1, warmup=False)
        peer_repeats = run_peer(problem_path, true_configs, dampings, args, warmup=False,
                                fisher_repeats=args.fisher_repeats)
        if args.float64:
            peer_64 = run_peer(problem_path, configs, dampings, args, warmup=False, dtype="float64")
    noise_rows = []
    for config in true_configs:
        seed_one = run_ours(setup, config, dampings, seed=1)[1]
        repeated = [run_ours(setup, config, dampings, seed=seed, fisher_repeats=args.fisher_repeats)[1]
                    for seed in (0, 1)]
        for damping in dampings:
            key = damping_name(damping)
            mine = ours[config.key].scores[key]
            noise_rows.append({"configuration": config.label(name == "cnn"), "damping": key,
                               "cross": agreement(mine, theirs[config.key].scores[key]),
                               "ours_seeds": agreement(mine, seed_one[key][0]),
                               "peer_seeds": agreement(theirs[config.key].scores[key],
                                                       peer_scores(peer_seed, config)[key]),
                               "cross_repeats": agreement(repeated[0][key][0], peer_scores(peer_repeats, config)[key]),
                               "ours_seeds_repeats": agreement(repeated[0][key][0], repeated[1][key][0])})
    if args.float64:
        setup_64 = float64_problem(setup, args.batch_size)
        for config in configs:
            results = run_ours(setup_64, config, dampings)[1]
            for row in rows:
                if row["key"] == config.key:
                    row["float64"] = agreement(results[row["damping"]][0], peer_scores(peer_64, config)[row["damping"]])
    profiles = {}
    for config in (Config("kfac", "empirical", "mean"), Config("ekfac", "empirical", "sum")):
        peer = theirs[config.key]
        profiles[config.label(name == "cnn")] = {
            "key": config.key, "damping": damping_name(1e-3), "stages": profile(setup, config, 1e-3),
            "kronfluence": {"fit": seconds_summary(peer.fit_seconds),
                            "scores": seconds_summary(peer.score_seconds[damping_name(1e-3)])}}
    return {"description": setup.description, "weights_digest": digest, "test_samples": args.test_samples,
            "dampings": [damping_name(d) for d in dampings], "fidelity_dampings": chosen, "rows": rows,
            "noise": noise_rows, "profile": profiles, "fisher_repeats": args.fisher_repeats}


def verdict(results: Dict[str, Dict[str, Any]]) -> List[str]:
    """The acceptance lines: Pearson ≥ 0.99 for K-FAC and EK-FAC (empirical Fisher, kronfluence's conventions) and
    kronfluence's time / ours ≥ 3."""
    lines = []
    for name, result in results.items():
        matching = [row for row in result["rows"] if row["solver"] == "ekfac" or row["scaling"] == "mean"]
        pearson = min(row["pearson"] for row in matching if row["fisher"] == "empirical")
        line = (f"{name}: min Pearson (empirical Fisher, kronfluence's conventions) {pearson:.4f} "
                f"({'PASS' if pearson >= PEARSON_TARGET else 'FAIL'} ≥ {PEARSON_TARGET}); kronfluence / ours")
        for label, speedups in (("medians", [row["speedup"] for row in matching]),
                                ("minima", [row["kronfluence_seconds"]["min"] / row["ours_seconds"]["min"]
                                            for row in matching])):
            line += (f", {label} over rounds: {min(speedups):.1f}× … {max(speedups):.1f}× (median over rows "
                     f"{np.median(speedups):.1f}×; {'PASS' if min(speedups) >= SPEED_TARGET else 'FAIL'} "
                     f"≥ {SPEED_TARGET:g}× on every row)")
        lines.append(line)
    return lines


def run_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Machine and settings of the run (with digests of the library's K-FAC modules as imported)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "torch_threads": args.threads,
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "batch_size": args.batch_size,
            "repeats": args.repeats, "dtype": "float32",
            "library_files": {module.__name__: hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]
                              for module in (kfac_ihvp, kronecker_blocks)}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--test-samples", type=int, default=200, help="T (the fidelity benchmark's report samples)")
    parser.add_argument("--dampings", default="1e-3", help="comma-separated λ besides the heuristic")
    parser.add_argument("--fidelity-json", type=Path, default=HERE / "results" / "fidelity.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size, both sides")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--fisher-repeats", type=int, default=8,
                        help="label draws per sample of the averaged true Fisher (noise comparison)")
    parser.add_argument("--float64", action="store_true", help="also the agreement of float64 runs (untimed)")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="suffix of the output names (kfac<tag>.md)")
    parser.add_argument("--from-json", type=Path, default=None, help="only render the markdown of a saved run")
    args = parser.parse_args(argv)
    args.dampings = [float(value) for value in args.dampings.split(",") if value.strip()]
    if not PEER_PYTHON.exists() and args.from_json is None:
        print(f"no peer venv at {PEER_PYTHON}: run `.venv/bin/python benchmarks/bench_peers.py --setup`")
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        settings, results = saved["environment"], saved["models"]
    else:
        settings = run_settings(args)
        results = {name: run_model(name, args) for name in args.models.split(",")}
        settings["load_average_after"] = os.getloadavg()
        (args.output_dir / f"kfac{args.tag}.json").write_text(
            json.dumps({"environment": settings, "models": results}, indent=1, default=float))
    markdown = render(settings, results)
    print("\n" + markdown, flush=True)
    (args.output_dir / f"kfac{args.tag}.md").write_text(markdown + "\n")
    print(f"wrote {args.output_dir / f'kfac{args.tag}.md'}" + (" and .json" if args.from_json is None else ""))
    return 0


def render(settings: Dict[str, Any], results: Dict[str, Dict[str, Any]]) -> str:
    """The markdown report of a run (from what ``kfac.json`` holds)."""
    lines = [f"Run of {settings['date']}: {settings['cpus']} CPUs, load average {settings['load_average'][0]:.1f} "
             f"before and {settings['load_average_after'][0]:.1f} after; TensorFlow {settings['tensorflow']} "
             f"(default threads), torch {settings['torch_threads']} threads; float32 on both sides; batch "
             f"{settings['batch_size']}; seconds: median [min] over {settings['repeats']} rounds; library files "
             + ", ".join(f"{name.rsplit('.', 1)[-1]} {digest}"
                         for name, digest in settings.get("library_files", {}).items()) + ".", ""]
    for result in results.values():
        lines += [f"**{result['description']}**; T = {result['test_samples']}, weights {result['weights_digest']}",
                  "", main_table(result["rows"]), "",
                  "True Fisher: Pearson over all pairs (median row Pearson in parentheses)", "",
                  noise_table(result["noise"], result.get("fisher_repeats", 8)), "",
                  "Where our time goes (λ = 1e-3):", "", profile_table(result["profile"]), ""]
    return "\n".join(lines + verdict(results))


if __name__ == "__main__":
    sys.exit(main())
