"""Typing aliases used across the library."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["Any", "Callable", "Dict", "List", "Optional", "Sequence", "Tuple", "Union"]
