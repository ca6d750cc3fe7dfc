"""TracIn (Pruthi et al. 2020): influence traced through training checkpoints."""
from .checkpoints import ModelsSaver
from .tracin import TracIn

__all__ = ["TracIn", "ModelsSaver"]
