"""TracIn's products from factored dense-layer gradients, compiled once per tuple of checkpoints.

Each call takes the samples themselves (a test batch and a training batch, or one batch for self-influence), builds
the factors of every checkpoint inside one compiled function and returns the products, so that a TracIn
computation is one dispatch per pair of batches. See :mod:`~deel.influenciae.common.dense_factors`.
"""
from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf

from ..common.dense_factors import DenseFactors, dense_factors_of, factored_gram, factored_squared_norms, guarded_call


class FactoredTracInKernels:
    """``Σ_k lr_k g_k(t)·g_k(z)`` and ``Σ_k lr_k ||g_k(z)||²`` for checkpoints watching dense kernels and biases only.

    Parameters
    ----------
    factors
        The :class:`DenseFactors` of every checkpoint's loss kernels.
    """

    def __init__(self, factors: Sequence[DenseFactors]):
        self.factors = list(factors)
        self.supported = True
        self._pairwise = tf.function(self._pairwise_eager, autograph=False, reduce_retracing=True)
        self._squared_norms = tf.function(self._squared_norms_eager, autograph=False, reduce_retracing=True)

    def _pairwise_eager(self, test_batch: Tuple, train_batch: Tuple, rates: tf.Tensor) -> tf.Tensor:
        return factored_gram([factors.factors_in_graph(test_batch) for factors in self.factors],
                             [factors.factors_in_graph(train_batch) for factors in self.factors], rates)

    def _squared_norms_eager(self, batch: Tuple, rates: tf.Tensor) -> tf.Tensor:
        return factored_squared_norms([factors.factors_in_graph(batch) for factors in self.factors], rates)

    def pairwise(self, test_batch: Tuple, train_batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """(B_t, B) values, or None when the checkpoints' structure is not supported."""
        return guarded_call(self, self._pairwise, tuple(test_batch), tuple(train_batch), rates)

    def squared_norms(self, batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """(B,) self-influence values, or None when the checkpoints' structure is not supported."""
        return guarded_call(self, self._squared_norms, tuple(batch), rates)


def factored_tracin_kernels(models: Sequence[Any]) -> Optional[FactoredTracInKernels]:
    """The kernels of a tuple of checkpoint models, created once and kept with the first checkpoint's loss kernels
    (so new TracIn objects on the same checkpoints trace nothing); None if a model has no loss kernels."""
    kernels: List[Any] = [getattr(model, "kernels", None) for model in models]
    if any(kernel is None for kernel in kernels):
        return None
    cache = kernels[0].compiled_cache.setdefault("factored_tracin", [])
    for known, compiled in cache:
        if len(known) == len(kernels) and all(a is b for a, b in zip(known, kernels)):
            return compiled
    compiled = FactoredTracInKernels([dense_factors_of(kernel) for kernel in kernels])
    cache.append((tuple(kernels), compiled))
    return compiled
