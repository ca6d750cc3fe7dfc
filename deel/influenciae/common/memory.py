"""Memory budgets: the default budget and the size of tensors held."""
from typing import Any

import numpy as np
import tensorflow as tf

# Default budget of what a computation may hold beyond its inputs (the same default everywhere).
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 1024 ** 3


def structure_bytes(structure: Any) -> int:
    """Bytes held by the tensors of a structure (tensors, arrays, nested tuples/lists/dicts of them)."""
    total = 0
    for tensor in tf.nest.flatten(structure):
        dtype = tf.as_dtype(tensor.dtype)
        total += int(np.prod(tensor.shape)) * dtype.size
    return total
