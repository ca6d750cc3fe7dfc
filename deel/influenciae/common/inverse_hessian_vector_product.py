"""Inverse-Hessian-vector products (IHVPs): the ``H⁻¹ v`` at the heart of influence functions.

``H`` is the **mean** Hessian of the per-sample loss over a "hessian dataset", with respect to the watched
weights of an :class:`~deel.influenciae.common.InfluenceModel`. With ``regularization = λ`` every solver
inverts the damped matrix ``H + λ I`` instead (``λ = 0`` keeps the reference behaviour: a pseudo-inverse for
the exact solver). Vectors are laid out as columns: a batch of B vectors is a (P, B) tensor.

This module gathers the solvers under the reference's module path and keeps its way of choosing one (the
:class:`IHVPCalculator` enum, :func:`build_ihvp`); each solver lives in its own module and is registered in
:mod:`.solver_registry`:

* :class:`ExactIHVP` (:mod:`.exact_ihvp`): the full Hessian factorised once. O(P²) memory: P up to ~10k.
* :class:`ConjugateGradientDescentIHVP`, :class:`LissaIHVP` (:mod:`.iterative_ihvp`): Hessian-vector products only.
* :class:`~deel.influenciae.common.ArnoldiIHVP` (:mod:`.arnoldi_ihvp`): the k dominant Ritz pairs of H.
"""
from enum import Enum
from typing import Any, Optional

import tensorflow as tf

from .arnoldi_ihvp import ArnoldiIHVP
from .curvature import HVP_CHUNK_FLOATS, CurvatureOperator, ForwardOverBackwardHVP, HessianOperator
from .exact_ihvp import ExactIHVP, estimate_exact_hessian_bytes
from .ihvp_base import InverseHessianVectorProduct, LowRankInverse
from .iterative_ihvp import ConjugateGradientDescentIHVP, IterativeIHVP, LissaIHVP
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel
from .solver_registry import build_solver, solver_entry

ConjugateGradientIHVP = ConjugateGradientDescentIHVP

__all__ = ["InverseHessianVectorProduct", "ExactIHVP", "ConjugateGradientDescentIHVP", "ConjugateGradientIHVP",
           "LissaIHVP", "ArnoldiIHVP", "IterativeIHVP", "ForwardOverBackwardHVP", "HessianOperator",
           "CurvatureOperator", "LowRankInverse", "IHVPCalculator", "build_ihvp", "estimate_exact_hessian_bytes",
           "HVP_CHUNK_FLOATS", "DEFAULT_MEMORY_BUDGET_BYTES"]


class IHVPCalculator(Enum):
    """The built-in IHVP solvers as enum members; names of every registered solver are read by
    :meth:`from_string`."""

    Exact = ExactIHVP
    Cgd = ConjugateGradientDescentIHVP
    Lissa = LissaIHVP
    Arnoldi = ArnoldiIHVP

    @staticmethod
    def from_string(ihvp_calculator: str) -> "IHVPCalculator":
        """Map a registered name (``'exact'``, ``'cgd'``, ``'lissa'``, ``'arnoldi'``, case-insensitive) to a member.

        Raises
        ------
        ValueError
            For a name that is not registered, or a registered solver that has no member.
        """
        if not isinstance(ihvp_calculator, str):
            raise ValueError(f"ihvp_calculator must be a solver name, got {ihvp_calculator!r}.")
        solver_class = solver_entry(ihvp_calculator).solver_class
        for member in IHVPCalculator:
            if member.value is solver_class:
                return member
        raise ValueError(f"The solver {ihvp_calculator!r} has no IHVPCalculator member; pass its name or its "
                         "configuration instead.")


def build_ihvp(ihvp_calculator: Any, model: BaseInfluenceModel, dataset: Optional[tf.data.Dataset],
               regularization: float = 0.0) -> InverseHessianVectorProduct:
    """Resolve a solver given by name, enum member, configuration, class, factory or instance into a fitted
    instance (see :func:`~deel.influenciae.common.solver_registry.build_solver`). Names and classes are built on
    ``dataset`` with default settings and the given ``regularization``; instances are returned as they are."""
    return build_solver(ihvp_calculator, model, dataset, regularization)
