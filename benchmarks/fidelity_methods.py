"""The library's pairwise methods as the fidelity benchmark runs them: (300, N) scores per damping, and seconds.

Influence functions watch every layer (``start_layer=0``); each solver is fitted once, at its largest damping, and
re-damped with ``with_regularization`` for the others of :data:`DAMPINGS` and the library's default λ = 0 (exact: one
Hessian and one eigendecomposition, a Cholesky factor where ``H + λI`` is positive definite; Arnoldi: one Arnoldi
iteration; CG and LiSSA: new solves). The exact solver also runs on the Gauss–Newton matrix (the true Fisher of the
softmax cross-entropy) and on the empirical Fisher (:class:`~deel.influenciae.common.FisherOperator`), positive
semi-definite: one Cholesky per λ > 0, no default (λ = 0 would be a pseudo-inverse of a singular matrix). K-FAC and
EK-FAC (:class:`~deel.influenciae.common.KFACIHVP`, :class:`~deel.influenciae.common.EKFACIHVP`; block-diagonal
Kronecker-factored Fisher, empirical or true, the library's defaults otherwise: ``position_scaling="sum"``, seed 0
for the true Fisher's labels) are fitted once and re-damped over :data:`DAMPINGS` and their default λ = 0 (the
pseudo-inverse of each block, from the eigendecompositions the fit already holds). Failures (CG on an indefinite
matrix, LiSSA diverging) are recorded, not fatal.

Projected methods (:class:`~deel.influenciae.common.GradientProjector`, dense, d = 2,048, seed 0): TRAK
(:class:`~deel.influenciae.trak.TRAK`) as its paper and traker compute it (gradients of the margin
:func:`~deel.influenciae.trak.margin_loss`, ``reweight="margin"``), on the final checkpoint and over the four
checkpoints, plus TRAK of the cross-entropy gradients on the final checkpoint; each is fitted once (a pass over the
training set and one eigendecomposition per model) at its default damping (λ = 0.1 × the mean eigenvalue of ΦᵀΦ/N,
the key None) and re-damped with ``with_regularization(λ, damping_heuristic=None)`` for λ = 0 and every λ of
:data:`TRAK_DAMPINGS`. Projected TracIn: :class:`~deel.influenciae.trac_in.TracIn` over the four checkpoints with the
same projector (no damping).
"""
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

from deel.influenciae.common import (ArnoldiIHVP, ConjugateGradientDescentIHVP, EKFACIHVP, ExactIHVP,
                                     FisherOperator, GradientProjector, InfluenceModel, KFACIHVP, LissaIHVP)
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.rps import RepresenterPointL2, RepresenterPointLJE
from deel.influenciae.trac_in import TracIn
from deel.influenciae.trak import TRAK, margin_loss

import fidelity_problems as problems  # pylint: disable=wrong-import-order

DAMPINGS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
ITERATIVE_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # CG and LiSSA: each candidate is a new solve
RPS_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)  # RPS-L2's λ (its surrogate's L2 penalty); default 1e-3
TRAIN_BATCH = 256
EXACT_MEMORY_BUDGET = 20 * 2 ** 30
FISHER_DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # F + λI is positive definite: one Cholesky per λ
# method name -> (solver class, Fisher kind, row label) of the Kronecker-factored solvers
KRONECKER_METHODS = {"kfac": (KFACIHVP, "empirical", "influence, K-FAC, empirical Fisher"),
                     "kfac_true": (KFACIHVP, "true", "influence, K-FAC, true Fisher"),
                     "ekfac": (EKFACIHVP, "empirical", "influence, EK-FAC, empirical Fisher"),
                     "ekfac_true": (EKFACIHVP, "true", "influence, EK-FAC, true Fisher")}
METHOD_NAMES = ("exact", "cg", "lissa", "arnoldi", "fisher", "fisher_empirical", *KRONECKER_METHODS, "tracin",
                "tracin_projected", "trak", "trak_srht", "rps_l2", "rps_lje")
PROJECTION_DIM = 2048  # TRAK's and projected TracIn's d (dense GradientProjector, seed 0)
# TRAK's λ (on ΦᵀΦ/N): the grid above and larger values, since the margin's kernel has a mean eigenvalue ~1.5 on the
# MLP (its default λ = 0.1 × that); traker gets the same values, converted to its scale.
TRAK_DAMPINGS = (*DAMPINGS, 3.0, 10.0, 30.0)


@dataclasses.dataclass
class MethodResult:
    """Scores of one method.

    Attributes
    ----------
    name
        Row label.
    scores
        Damping -> (300, N) scores (this library's sign convention); key None for an undamped method, or for a
        method's own default damping rule (a peer's default, TRAK's 0.1 × mean eigenvalue).
    default
        The key of the default damping in ``scores`` (None: undamped, or the peer's default).
    fit_seconds
        Wall time of the fit (the data pass: Hessian, Arnoldi iteration, cached inputs, a peer's factors).
    seconds_by_damping
        Damping -> wall time of the re-damping and the score matrix at that damping.
    failures
        Damping -> why it has no scores.
    """

    name: str
    scores: Dict[Optional[float], np.ndarray]
    default: Optional[float]
    fit_seconds: float
    seconds_by_damping: Dict[Optional[float], float] = dataclasses.field(default_factory=dict)
    failures: Dict[float, str] = dataclasses.field(default_factory=dict)

    def seconds(self, damping: Optional[float]) -> float:
        """Fit plus (re-damping and) score matrix at ``damping``: what one run at that λ costs (an upper bound for
        a re-damped exact solver, which counts one extra factorisation)."""
        return self.fit_seconds + self.seconds_by_damping.get(damping, float("nan"))


def _loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")


def _datasets(problem: problems.FidelityProblem):
    train = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train)).batch(TRAIN_BATCH)
    test = tf.data.Dataset.from_tensor_slices((problem.x_test, problem.y_test)).batch(len(problem.x_test))
    return train, test


def _matrix(calculator, test: tf.data.Dataset, train: tf.data.Dataset, expected: tuple) -> np.ndarray:
    scores = np.asarray(calculator.influence_matrix(test, train), dtype=np.float64)
    if scores.shape != expected:
        raise AssertionError(f"{type(calculator).__name__}.influence_matrix gave {scores.shape}, expected {expected}")
    return scores


def _needs_eigendecomposition(solver: ExactIHVP, damping: float) -> Optional[str]:
    """Why the exact solver is not run at ``damping``: where ``H + λI`` is not positive definite (λ <= -λ_min, the
    smallest eigenvalue of H found by Lanczos in seconds) the library would take the eigendecomposition of the P×P
    matrix, 10 minutes at P = 13,120 on 2 cores (and 14 GiB: it was killed for memory beside the test suite)."""
    if "lowest" not in _LOWEST:
        hessian = np.asarray(solver.hessian, dtype=np.float64)
        _LOWEST["lowest"] = float(scipy.sparse.linalg.eigsh(hessian, k=1, which="SA", return_eigenvectors=False,
                                                            tol=1e-6, v0=np.ones(hessian.shape[0]))[0])
        print(f"  exact: smallest eigenvalue of H {_LOWEST['lowest']:.3g}", flush=True)
    if damping + _LOWEST["lowest"] <= 0:
        return (f"not run: H + λI is indefinite (smallest eigenvalue of H {_LOWEST['lowest']:.3g}), which needs the "
                "eigendecomposition of the P×P matrix (about 10 minutes and 14 GiB at P = 13,120)")
    return None


_LOWEST: Dict[str, float] = {}


def _swept(name: str, fit: Callable[[float], object], scores_of: Callable[[object], np.ndarray],
           dampings: Sequence[float], with_default: bool = True,
           skip: Callable[[object, float], Optional[str]] = lambda solver, damping: None) -> MethodResult:
    """Fit once at the largest damping, then re-damp for every other candidate and for the default λ = 0 (largest
    first: the exact solver factorises by Cholesky while ``H + λI`` is positive definite, and its one
    eigendecomposition is then shared by every smaller λ)."""
    candidates = sorted({0.0, *dampings} if with_default else set(dampings), reverse=True)
    start = time.perf_counter()
    solver = fit(candidates[0])
    result = MethodResult(name, {}, 0.0, time.perf_counter() - start)
    if not with_default:
        result.failures[0.0] = "not run: λ = 0 is the pseudo-inverse of a singular matrix (an eigendecomposition)"
    for damping in candidates:
        reason = skip(solver, damping)
        if reason:
            result.failures[damping] = reason
            continue
        begin = time.perf_counter()
        try:
            result.scores[damping] = scores_of(solver if damping == candidates[0]
                                               else solver.with_regularization(damping))
            result.seconds_by_damping[damping] = time.perf_counter() - begin
        except ValueError as error:
            result.failures[damping] = str(error).split("\n", maxsplit=1)[0]
    print(f"  {name}: {len(result.scores)} dampings scored, {len(result.failures)} failed; "
          f"fit {result.fit_seconds:.1f} s; "
          + " ".join(f"{damping:g}: {seconds:.1f} s" for damping, seconds in result.seconds_by_damping.items())
          + "".join(f"\n    λ={damping:g}: {reason[:150]}" for damping, reason in result.failures.items()),
          flush=True)
    return result


def library_methods(problem: problems.FidelityProblem, model: keras.Model, checkpoints: List[List[np.ndarray]],
                    only: Optional[Sequence[str]] = None) -> List[MethodResult]:
    """Every pairwise method of the library on the trained ``model`` (its weights: the last checkpoint)."""
    unknown = set(only or ()) - set(METHOD_NAMES)
    if unknown:
        raise ValueError(f"Unknown methods {sorted(unknown)}; expected some of {METHOD_NAMES}.")
    wanted = set(only or METHOD_NAMES)
    train, test = _datasets(problem)
    shape = (len(problem.x_test), len(problem.x_train))
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=_loss())

    def first_order(solver) -> np.ndarray:
        return _matrix(FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=solver), test, train,
                       shape)

    results = []
    if "exact" in wanted:
        _LOWEST.clear()  # a new model
        results.append(_swept("influence, exact", lambda damping: ExactIHVP(
            influence_model, train, regularization=damping, memory_budget_bytes=EXACT_MEMORY_BUDGET), first_order,
            DAMPINGS, skip=_needs_eigendecomposition))
    for kind, method in (("true", "fisher"), ("empirical", "fisher_empirical")):
        if method in wanted:
            label = "Gauss–Newton (true Fisher)" if kind == "true" else "empirical Fisher"
            results.append(_swept(f"influence, exact, {label}", lambda damping, kind=kind: ExactIHVP(
                influence_model, curvature=FisherOperator(influence_model, train, kind=kind), regularization=damping,
                memory_budget_bytes=EXACT_MEMORY_BUDGET), first_order, FISHER_DAMPINGS, with_default=False))
    for method, (solver_class, fisher, label) in KRONECKER_METHODS.items():
        if method in wanted:
            results.append(_swept(label, lambda damping, solver_class=solver_class, fisher=fisher: solver_class(
                influence_model, train, regularization=damping, fisher=fisher, seed=0), first_order, DAMPINGS))
    if "cg" in wanted:
        results.append(_swept("influence, CG (100 iterations)",
                              lambda damping: ConjugateGradientDescentIHVP(influence_model, None, train,
                                                                           regularization=damping), first_order,
                              ITERATIVE_DAMPINGS))
    if "lissa" in wanted:
        results.append(_swept("influence, LiSSA (100 iterations)",
                              lambda damping: LissaIHVP(influence_model, None, train, regularization=damping),
                              first_order, ITERATIVE_DAMPINGS))
    if "arnoldi" in wanted:
        results.append(_swept("influence, Arnoldi (rank 200)",
                              lambda damping: ArnoldiIHVP(influence_model, train, subspace_dim=200,
                                                          regularization=damping), first_order, DAMPINGS))
    others = {"tracin": lambda: _tracin(model, checkpoints, train, test, shape),
              "tracin_projected": lambda: [_tracin_projected(model, checkpoints, train, test, shape)],
              "trak": lambda: _trak(model, checkpoints, train, test, shape),
              "trak_srht": lambda: _trak_srht(model, checkpoints, train, test, shape),
              "rps_l2": lambda: [_rps_l2(model, train, test, shape)],
              "rps_lje": lambda: [_rps_lje(model, train, test, shape)]}
    for method, run in others.items():
        if method in wanted:
            results.extend(run())
    return results


def checkpoint_models(model: keras.Model, checkpoints: List[List[np.ndarray]],
                      loss: Optional[Callable] = None) -> List[InfluenceModel]:
    """One influence model per checkpoint (clones of ``model``), every layer watched, ``loss`` (default: the
    cross-entropy)."""
    models = []
    for weights in checkpoints:
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
        models.append(InfluenceModel(copy, start_layer=0, last_layer=-1,
                                     loss_function=_loss() if loss is None else loss))
    return models


def _tracin(model: keras.Model, checkpoints: List[List[np.ndarray]], train: tf.data.Dataset, test: tf.data.Dataset,
            shape: tuple) -> List[MethodResult]:
    """TracIn with the final checkpoint (the gradient dot product) and with all four."""
    models = checkpoint_models(model, checkpoints)
    results = []
    for label, chosen in (("TracIn, final checkpoint", models[-1:]),
                          (f"TracIn, {len(models)} checkpoints", models)):
        start = time.perf_counter()
        calculator = TracIn(chosen, [problems.LEARNING_RATE] * len(chosen))
        scores = _matrix(calculator, test, train, shape)
        results.append(MethodResult(label, {None: scores}, None, time.perf_counter() - start, {None: 0.0}))
    return results


def _tracin_projected(model: keras.Model, checkpoints: List[List[np.ndarray]], train: tf.data.Dataset,
                      test: tf.data.Dataset, shape: tuple) -> MethodResult:
    """TracIn over every checkpoint with the gradients projected to d = :data:`PROJECTION_DIM`."""
    models = checkpoint_models(model, checkpoints)
    start = time.perf_counter()
    calculator = TracIn(models, [problems.LEARNING_RATE] * len(models),
                        projector=GradientProjector(PROJECTION_DIM, seed=0))
    scores = _matrix(calculator, test, train, shape)
    seconds = time.perf_counter() - start
    print(f"  projected TracIn: {seconds:.1f} s", flush=True)
    return MethodResult(f"TracIn, {len(models)} checkpoints, projected (d = {PROJECTION_DIM})", {None: scores}, None,
                        seconds, {None: 0.0})


def _trak_swept(name: str, models: List[InfluenceModel], train: tf.data.Dataset, test: tf.data.Dataset,
                shape: tuple, reweight: Optional[str], kind: str = "rademacher") -> MethodResult:
    """One TRAK fit at the default damping (key None), re-damped for λ = 0 and every λ of :data:`TRAK_DAMPINGS`."""
    start = time.perf_counter()
    calculator = TRAK(models, train, projector=GradientProjector(PROJECTION_DIM, seed=0, kind=kind), reweight=reweight)
    result = MethodResult(name, {}, None, time.perf_counter() - start)
    for damping in (None, 0.0, *TRAK_DAMPINGS):
        begin = time.perf_counter()
        redamped = calculator if damping is None else calculator.with_regularization(damping, damping_heuristic=None)
        try:
            result.scores[damping] = _matrix(redamped, test, train, shape)
            result.seconds_by_damping[damping] = time.perf_counter() - begin
        except ValueError as error:
            result.failures[damping] = str(error).split("\n", maxsplit=1)[0]
    print(f"  {name}: default λ (0.1 × mean eigenvalue) = " + ", ".join(f"{value:.3g}" for value in calculator.dampings)
          + f"; fit {result.fit_seconds:.1f} s, scores {np.median(list(result.seconds_by_damping.values())):.1f} s "
          f"per damping ({len(result.scores)} scored, {len(result.failures)} failed)", flush=True)
    return result


def _trak(model: keras.Model, checkpoints: List[List[np.ndarray]], train: tf.data.Dataset, test: tf.data.Dataset,
          shape: tuple) -> List[MethodResult]:
    """TRAK of the margin (the paper's, reweighted by 1 - p) on the final checkpoint and over all of them, and TRAK of
    the cross-entropy gradients on the final checkpoint."""
    margin_models = checkpoint_models(model, checkpoints, margin_loss)
    return [_trak_swept(f"TRAK, final checkpoint (margin, d = {PROJECTION_DIM})", margin_models[-1:], train, test,
                        shape, "margin"),
            _trak_swept(f"TRAK, {len(margin_models)} checkpoints (margin, d = {PROJECTION_DIM})", margin_models, train,
                        test, shape, "margin"),
            _trak_swept(f"TRAK, final checkpoint (cross-entropy, d = {PROJECTION_DIM})",
                        checkpoint_models(model, checkpoints[-1:]), train, test, shape, None)]


def _trak_srht(model: keras.Model, checkpoints: List[List[np.ndarray]], train: tf.data.Dataset,
               test: tf.data.Dataset, shape: tuple) -> List[MethodResult]:
    """TRAK of the margin on the final checkpoint and over all of them, projected by the subsampled randomized
    Hadamard transform (``kind="srht"``)."""
    margin_models = checkpoint_models(model, checkpoints, margin_loss)
    return [_trak_swept(f"TRAK, final checkpoint (margin, SRHT d = {PROJECTION_DIM})", margin_models[-1:], train,
                        test, shape, "margin", "srht"),
            _trak_swept(f"TRAK, {len(margin_models)} checkpoints (margin, SRHT d = {PROJECTION_DIM})", margin_models,
                        train, test, shape, "margin", "srht")]


def _rps_lje(model: keras.Model, train: tf.data.Dataset, test: tf.data.Dataset, shape: tuple) -> MethodResult:
    """RPS-LJE (exact inverse Hessian of the last layer), undamped."""
    start = time.perf_counter()
    calculator = RepresenterPointLJE(InfluenceModel(model, start_layer=-1, loss_function=_loss()), train,
                                     ihvp_calculator="exact")
    scores = _matrix(calculator, test, train, shape)
    return MethodResult("RPS-LJE", {None: scores}, None, time.perf_counter() - start, {None: 0.0})


def _rps_l2(model: keras.Model, train: tf.data.Dataset, test: tf.data.Dataset, shape: tuple) -> MethodResult:
    """RPS-L2 at each of its own L2 penalties (default 1e-3); seconds at the default."""
    result = MethodResult("RPS-L2", {}, 1e-3, 0.0)
    for damping in RPS_DAMPINGS:
        start = time.perf_counter()
        calculator = RepresenterPointL2(model, train, _loss(), lambda_regularization=damping)
        result.scores[damping] = _matrix(calculator, test, train, shape)
        result.seconds_by_damping[damping] = time.perf_counter() - start
    return result
