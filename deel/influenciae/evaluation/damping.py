"""Pick the damping λ of a method by what retraining says: the linear datamodeling score or leave-one-out.

The damping added to the curvature (``H + λI``) changes the scores far more than the solver does (on a digits MLP
the LDS of exact influence goes from 0.19 at λ = 0.1 to 0.39 at λ = 3e-4), and no closed-form rule picks it. This
module scores a grid of λ against retrained models on a small validation budget: test samples that are *not* the
ones reported on, and the same retrained models (their outputs on those samples cost nothing more).
"""
import dataclasses
import logging
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from .lds import check_lds_inputs, linear_datamodeling_score
from .leave_one_out import leave_one_out_correlation

LOGGER = logging.getLogger(__name__)

ScoresForDamping = Callable[[float], object]


@dataclasses.dataclass(frozen=True)
class DampingSelection:
    """The result of :func:`select_damping`.

    Attributes
    ----------
    best
        The damping with the largest criterion (the largest such λ on ties).
    dampings
        (D,) the candidates, in the order given.
    values
        (D,) the criterion at each candidate: the LDS, or the leave-one-out Spearman correlation; NaN where the
        method failed (see ``failures``).
    criterion
        ``"lds"`` or ``"leave_one_out"``.
    failures
        Damping -> the message of the ``ValueError`` the method raised (e.g. LiSSA diverging at a small λ).
    """

    best: float
    dampings: np.ndarray
    values: np.ndarray
    criterion: str
    failures: Dict[float, str]

    @property
    def best_value(self) -> float:
        """The criterion at :attr:`best`."""
        return float(self.values[int(np.flatnonzero(self.dampings == self.best)[0])])


def damping_grid(low: float = 1e-6, high: float = 1e-1, per_decade: int = 1) -> np.ndarray:
    """Log-spaced candidates from ``low`` to ``high`` (both included): (D,) float64.

    Raises
    ------
    ValueError
        Unless ``0 < low <= high`` and ``per_decade >= 1``.
    """
    if not 0 < low <= high or not np.isfinite(high):
        raise ValueError(f"damping_grid needs 0 < low <= high, got low={low}, high={high}.")
    if int(per_decade) < 1:
        raise ValueError(f"per_decade must be >= 1, got {per_decade}.")
    count = int(round(np.log10(high / low) * int(per_decade))) + 1
    return np.geomspace(low, high, max(count, 1)) if count > 1 else np.asarray([float(low)])


def _checked_dampings(dampings: Sequence[float]) -> np.ndarray:
    values = np.asarray(dampings, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("dampings must hold at least one candidate.")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"dampings must be finite numbers >= 0, got {values.tolist()}.")
    if np.unique(values).size != values.size:
        raise ValueError(f"dampings must be distinct, got {values.tolist()}.")
    return values


def select_damping(scores_for: ScoresForDamping, dampings: Sequence[float], *, masks: Optional[object] = None,
                   outputs: Optional[object] = None, actual_changes: Optional[object] = None) -> DampingSelection:
    """Score every candidate damping against retraining and return the best.

    Give either ``masks`` and ``outputs`` (criterion: :func:`linear_datamodeling_score`) or ``actual_changes``
    (criterion: the Spearman correlation of :func:`leave_one_out_correlation`). The test samples behind
    ``outputs``/``actual_changes`` are the validation budget: keep them apart from the samples you report on,
    or the chosen λ is fitted to the report.

    Parameters
    ----------
    scores_for
        ``scores_for(λ)`` -> the method's scores at damping λ, in this library's sign convention: (T, N) for
        the LDS, (T, K) scores of the K removed samples for leave-one-out. A ``ValueError`` it raises marks that
        candidate as failed (NaN) instead of stopping the sweep, as do scores that rank no subset (all equal).
        Make it cheap by fitting the curvature once and re-damping it
        (:meth:`~deel.influenciae.common.InverseHessianVectorProduct.with_regularization`).
    dampings
        (D,) distinct candidates λ ≥ 0 (e.g. :func:`damping_grid`).
    masks, outputs
        (M, N) kept samples of each retrained subset and (M, T) outputs of the retrained models on the
        validation samples (see :func:`linear_datamodeling_score`).
    actual_changes
        (T, K) retrained leave-one-out changes (see :func:`leave_one_out_correlation`).

    Returns
    -------
    DampingSelection

    Raises
    ------
    ValueError
        On an empty, negative, non-finite or repeated candidate, when neither or both criteria are given, on
        inputs the criterion refuses, or when every candidate failed.
    """
    candidates = _checked_dampings(dampings)
    use_lds = masks is not None or outputs is not None
    if use_lds == (actual_changes is not None):
        raise ValueError("select_damping needs either masks and outputs (LDS) or actual_changes (leave-one-out), "
                         "not both and not neither.")
    if use_lds:
        if masks is None or outputs is None:
            raise ValueError("The LDS criterion needs both masks (M, N) and outputs (M, T).")
        criterion = "lds"
    else:
        criterion = "leave_one_out"
    values = np.full(candidates.shape, np.nan)
    failures: Dict[float, str] = {}
    for position, damping in enumerate(candidates):
        try:
            scores = np.asarray(scores_for(float(damping)), dtype=np.float64)
        except ValueError as error:
            failures[float(damping)] = str(error)
            LOGGER.warning("select_damping: the method failed at damping %g: %s", damping, error)
            continue
        if use_lds:
            check_lds_inputs(scores, masks, outputs)  # a wrong shape is a bug of the caller: raised
            try:
                values[position] = linear_datamodeling_score(scores, masks, outputs).score
            except ValueError as error:  # e.g. scores without any ranking at this damping
                failures[float(damping)] = str(error)
        else:
            values[position] = leave_one_out_correlation(scores, actual_changes).spearman
    if np.all(np.isnan(values)):
        raise ValueError(f"select_damping: the method failed at every damping: {failures}.")
    finite = np.where(np.isnan(values), -np.inf, values)
    best_positions = np.flatnonzero(finite == finite.max())
    best = float(candidates[best_positions].max())
    return DampingSelection(best=best, dampings=candidates, values=values, criterion=criterion, failures=failures)
