"""Alias of :mod:`deel.influenciae.boundary_based` (same classes)."""
from ..boundary_based import SampleBoundaryCalculator, WeightsBoundaryCalculator

__all__ = ["SampleBoundaryCalculator", "WeightsBoundaryCalculator"]
