"""The core everything stands on: influence models, curvature operators and solvers (one registry), the executor
of passes over data, the vector store, base calculators."""
from .exact_ihvp import ExactConfig, ExactIHVP
from .iterative_ihvp import (ConjugateGradientConfig, ConjugateGradientDescentIHVP, IterativeIHVP, LissaConfig,
                             LissaIHVP)
from .arnoldi_ihvp import ArnoldiConfig, ArnoldiIHVP
from .base_influence import CACHE, BaseInfluenceCalculator, SelfInfluenceCalculator
from .curvature import CurvatureOperator, ForwardOverBackwardHVP, HessianOperator
from .executor import Executor
from .fisher import FisherOperator
from .gauss_newton import GaussNewtonOperator
from .kfac_ihvp import EKFACConfig, EKFACIHVP, KFACConfig, KFACIHVP, KFACMemoryEstimate
from .kfac_queries import CompressedQueries
from .ihvp_base import InverseHessianVectorProduct, LowRankInverse
from .ihvp_factory import (ArnoldiIHVPFactory, CGDIHVPFactory, ExactIHVPFactory, InverseHessianVectorProductFactory,
                           LissaIHVPFactory)
from .inverse_hessian_vector_product import ConjugateGradientIHVP, IHVPCalculator, build_ihvp
from .layer_adapters import LayerAdapter, register_layer_adapter
from .layer_factors import LayerFactors
from .influence_index import InfluenceIndex
from .model_wrappers import BaseInfluenceModel, InfluenceModel
from .results import TopK
from .solver_registry import (SolverConfig, SolverEntry, build_solver, register_solver, registered_solvers,
                              solver_names)
from .vector_store import (DiskVectorStore, MemoryVectorStore, RecomputingVectorStore, VectorStore,
                           build_vector_store)

__all__ = [
    "CACHE", "BaseInfluenceCalculator", "SelfInfluenceCalculator", "CGDIHVPFactory", "ExactIHVPFactory",
    "InverseHessianVectorProductFactory", "LissaIHVPFactory", "ConjugateGradientDescentIHVP", "ConjugateGradientIHVP",
    "ExactIHVP", "ForwardOverBackwardHVP", "IHVPCalculator", "InverseHessianVectorProduct", "IterativeIHVP",
    "LissaIHVP", "BaseInfluenceModel", "InfluenceModel", "ArnoldiIHVP", "ArnoldiIHVPFactory", "build_ihvp",
    "CurvatureOperator", "HessianOperator", "LowRankInverse", "Executor", "TopK", "SolverConfig", "SolverEntry",
    "ExactConfig", "ConjugateGradientConfig", "LissaConfig", "ArnoldiConfig", "build_solver", "register_solver",
    "registered_solvers", "solver_names", "VectorStore", "MemoryVectorStore", "DiskVectorStore",
    "RecomputingVectorStore", "build_vector_store",
]
__all__ += ["LayerFactors", "LayerAdapter", "register_layer_adapter", "FisherOperator"]
__all__ += ["GaussNewtonOperator"]
__all__ += ["KFACIHVP", "EKFACIHVP", "KFACConfig", "EKFACConfig", "KFACMemoryEstimate", "CompressedQueries"]
from .gradient_projector import GradientProjector  # noqa: E402  pylint: disable=wrong-import-position

__all__ += ["GradientProjector"]
__all__ += ["InfluenceIndex"]
