"""Influence functions: first order (with RelatIF and groups)."""
from .base_group_influence import BaseGroupInfluenceCalculator
from .first_order_influence_calculator import FirstOrderInfluenceCalculator

__all__ = ["BaseGroupInfluenceCalculator", "FirstOrderInfluenceCalculator"]
