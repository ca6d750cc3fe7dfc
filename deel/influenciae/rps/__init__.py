"""Representer Point Selection: RPS-L2 (Yeh et al. 2018) and RPS-LJE (Sui et al. 2021)."""
from .base_representer_point import BaseRepresenterPoint
from .rps_l2 import RepresenterPointL2
from .rps_lje import RepresenterPointLJE

__all__ = ["BaseRepresenterPoint", "RepresenterPointL2", "RepresenterPointLJE"]
