"""Influence functions: first order (with RelatIF and groups), second order (groups) and Arnoldi."""
from .arnoldi_influence_calculator import ArnoldiInfluenceCalculator
from .base_group_influence import BaseGroupInfluenceCalculator
from .first_order_influence_calculator import FirstOrderInfluenceCalculator
from .second_order_influence_calculator import SecondOrderInfluenceCalculator

__all__ = ["ArnoldiInfluenceCalculator", "BaseGroupInfluenceCalculator", "FirstOrderInfluenceCalculator",
           "SecondOrderInfluenceCalculator"]
