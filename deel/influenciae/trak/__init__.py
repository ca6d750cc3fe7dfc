"""TRAK (Park et al. 2023): attribution from randomly projected gradients, over an ensemble of models."""
from .trak import TRAK, margin_loss

__all__ = ["TRAK", "margin_loss"]
