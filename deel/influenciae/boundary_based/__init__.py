"""Boundary-based self-influence: minus the DeepFool distance of each sample to the decision boundary, in
input space (:class:`SampleBoundaryCalculator`) or in weight space (:class:`WeightsBoundaryCalculator`)."""
from .sample_boundary import SampleBoundaryCalculator
from .weights_boundary import WeightsBoundaryCalculator

__all__ = ["SampleBoundaryCalculator", "WeightsBoundaryCalculator"]
