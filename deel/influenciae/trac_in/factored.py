"""TracIn's products from factored per-layer gradients, compiled once per tuple of checkpoints.

Each call takes the samples themselves (a test batch and a training batch, or one batch for self-influence), builds
the factors of every checkpoint inside one compiled function and returns the products (or the per-sample gradients
formed from the factors, for cached influence vectors), so that a TracIn computation is one dispatch per pair of
batches. Dense, ``EinsumDense``, ``Conv2D`` and ``Embedding`` weights are factored; biases, normalisation scales and
offsets get closed-form per-sample gradients; anything else is materialised by vectorized per-sample gradients of
those weights only. See :mod:`~deel.influenciae.common.dense_factors`.
"""
from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf

from ..common.dense_factors import (DenseFactors, dense_factors_of, factored_gradients, factored_gram,
                                    factored_squared_norms, guarded_call)


def _never_converted(function: Any) -> Any:
    """``function`` kept out of AutoGraph even when called from converted code (``tf.data`` maps): a
    ``tf.function(autograph=False)`` inherits the caller's conversion status otherwise."""
    return tf.autograph.experimental.do_not_convert(function)


class FactoredTracInKernels:
    """``Σ_k lr_k g_k(t)·g_k(z)``, ``Σ_k lr_k ||g_k(z)||²`` and ``[√lr_k g_k(z)]_k`` from factored gradients.

    Parameters
    ----------
    factors
        The :class:`DenseFactors` of every checkpoint's loss kernels.
    """

    def __init__(self, factors: Sequence[DenseFactors]):
        self.factors = list(factors)
        self.supported = True
        self._pairwise = tf.function(_never_converted(self._pairwise_eager), autograph=False,
                                     reduce_retracing=True)
        self._squared_norms = tf.function(_never_converted(self._squared_norms_eager), autograph=False,
                                          reduce_retracing=True)
        self._gradients = tf.function(_never_converted(self._gradients_eager), autograph=False,
                                      reduce_retracing=True)

    def _pairwise_eager(self, test_batch: Tuple, train_batch: Tuple, rates: tf.Tensor) -> tf.Tensor:
        return factored_gram([factors.factors_in_graph(test_batch) for factors in self.factors],
                             [factors.factors_in_graph(train_batch) for factors in self.factors], rates)

    def _squared_norms_eager(self, batch: Tuple, rates: tf.Tensor) -> tf.Tensor:
        return factored_squared_norms([factors.factors_in_graph(batch) for factors in self.factors], rates)

    def _gradients_eager(self, batch: Tuple, scales: tf.Tensor) -> tf.Tensor:
        return factored_gradients([factors.factors_in_graph(batch) for factors in self.factors], scales)

    def pairwise(self, test_batch: Tuple, train_batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """(B_t, B) values, or None when the checkpoints' structure is not supported."""
        return guarded_call(self, self._pairwise, tuple(test_batch), tuple(train_batch), rates)

    def squared_norms(self, batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """(B,) self-influence values, or None when the checkpoints' structure is not supported."""
        return guarded_call(self, self._squared_norms, tuple(batch), rates)

    def gradients(self, batch: Tuple, scales: tf.Tensor) -> Optional[tf.Tensor]:
        """``[scales[0] g_1, ..., scales[K-1] g_K]`` in the layout of the per-sample gradients of the checkpoints'
        InfluenceModels: (B, Σ_k P_k); None when the checkpoints' structure is not supported."""
        return guarded_call(self, self._gradients, tuple(batch), scales)


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
