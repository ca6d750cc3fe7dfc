"""The core everything stands on: influence models, inverse-Hessian-vector products, base calculators."""
from .arnoldi_ihvp import ArnoldiIHVP
from .base_influence import CACHE, BaseInfluenceCalculator, SelfInfluenceCalculator
from .ihvp_factory import (ArnoldiIHVPFactory, CGDIHVPFactory, ExactIHVPFactory, InverseHessianVectorProductFactory,
                           LissaIHVPFactory)
from .inverse_hessian_vector_product import (ConjugateGradientDescentIHVP, ConjugateGradientIHVP, ExactIHVP,
                                             ForwardOverBackwardHVP, IHVPCalculator, InverseHessianVectorProduct,
                                             IterativeIHVP, LissaIHVP)
from .model_wrappers import BaseInfluenceModel, InfluenceModel

__all__ = [
    "CACHE", "BaseInfluenceCalculator", "SelfInfluenceCalculator", "CGDIHVPFactory", "ExactIHVPFactory",
    "InverseHessianVectorProductFactory", "LissaIHVPFactory", "ConjugateGradientDescentIHVP", "ConjugateGradientIHVP",
    "ExactIHVP", "ForwardOverBackwardHVP", "IHVPCalculator", "InverseHessianVectorProduct", "IterativeIHVP",
    "LissaIHVP", "BaseInfluenceModel", "InfluenceModel", "ArnoldiIHVP", "ArnoldiIHVPFactory",
]
