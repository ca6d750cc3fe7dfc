"""The core everything stands on: influence models, inverse-Hessian-vector products, base calculators."""
from .base_influence import CACHE, BaseInfluenceCalculator, SelfInfluenceCalculator
from .ihvp_factory import CGDIHVPFactory, ExactIHVPFactory, InverseHessianVectorProductFactory, LissaIHVPFactory
from .inverse_hessian_vector_product import (ConjugateGradientDescentIHVP, ConjugateGradientIHVP, ExactIHVP,
                                             ForwardOverBackwardHVP, IHVPCalculator, InverseHessianVectorProduct,
                                             IterativeIHVP, LissaIHVP)
from .model_wrappers import BaseInfluenceModel, InfluenceModel

__all__ = [
    "CACHE", "BaseInfluenceCalculator", "SelfInfluenceCalculator", "CGDIHVPFactory", "ExactIHVPFactory",
    "InverseHessianVectorProductFactory", "LissaIHVPFactory", "ConjugateGradientDescentIHVP", "ConjugateGradientIHVP",
    "ExactIHVP", "ForwardOverBackwardHVP", "IHVPCalculator", "InverseHessianVectorProduct", "IterativeIHVP",
    "LissaIHVP", "BaseInfluenceModel", "InfluenceModel",
]
