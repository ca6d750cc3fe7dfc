"""TracIn's products from the per-layer factors of every checkpoint.

Each checkpoint's :attr:`~deel.influenciae.common.model_wrappers.BaseInfluenceModel.layer_factors` computes, in one
compiled function per product, the factors of a test batch and a training batch (or of one batch) and their
products, without the (B, P) per-sample gradients for the factored layers (Dense, EinsumDense, Conv2D, Embedding;
closed forms for biases and normalisation weights; materialised per-sample gradients for the other weights only).
TracIn weighs the checkpoints' products by their learning rates.
"""
from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf

from ..common.factor_kernels import LayerFactorKernels, WeightedProducts, weighted_products


class FactoredTracInKernels:
    """``Σ_k lr_k g_k(t)·g_k(z)``, ``Σ_k lr_k ||g_k(z)||²`` and ``[√lr_k g_k(z)]_k`` from per-layer factors.

    Each method returns None when a checkpoint's plan gets no weight from its layers (every per-sample gradient
    would go through the whole model): TracIn's generic path then computes the test-side gradients once instead of
    once per training batch.

    Parameters
    ----------
    factors
        The :class:`~deel.influenciae.common.factor_kernels.LayerFactorKernels` of every checkpoint.
    """

    def __init__(self, factors: Sequence[LayerFactorKernels]):
        self.factors: List[LayerFactorKernels] = list(factors)
        self._products: Optional[WeightedProducts] = None

    def _compiled(self) -> WeightedProducts:
        # One compiled function per product over every checkpoint (shared by TracIn objects on the same models).
        if self._products is None:
            self._products = weighted_products(self.factors)
        return self._products

    @property
    def supported(self) -> bool:
        """Whether every watched weight of every checkpoint gets its per-sample gradients from its layer (none
        through the whole model); False until the checkpoints' plans are built (first batch)."""
        return all(factors.plan is not None and factors.plan.fully_factored for factors in self.factors)

    def usable(self, batch: Tuple) -> bool:
        """Whether the factored products apply to batches shaped like ``batch`` (rows one per sample)."""
        return all(factors.plan_for(batch).uses_layers for factors in self.factors)

    def pairwise(self, test_batch: Tuple, train_batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """``Σ_k lr_k g_k(t)·g_k(z)``: (B_t, B), or None (see the class)."""
        test_batch, train_batch = tuple(test_batch), tuple(train_batch)
        if not self.usable(test_batch):
            return None
        return self._compiled().pairwise(test_batch, train_batch, rates)

    def held_test_factors(self, test_batch: Tuple) -> Optional[Tuple]:
        """Every checkpoint's factors of ``test_batch`` as tensors (rows, output gradients, closed forms), to be
        held for :meth:`pairwise_with_held`; None (see the class)."""
        test_batch = tuple(test_batch)
        if not self.usable(test_batch):
            return None
        return tuple(factors.tensors(test_batch) for factors in self.factors)

    def held_bytes_per_sample(self, test_batch: Tuple) -> Optional[int]:
        """Bytes per sample of :meth:`held_test_factors` for batches shaped like ``test_batch``, known without
        computing them; None when unknown."""
        sizes = [factors.tensors_bytes_per_sample(tuple(test_batch)) for factors in self.factors]
        return None if any(size is None for size in sizes) else sum(sizes)

    def pairwise_with_held(self, held: Tuple, train_batch: Tuple, rates: tf.Tensor) -> tf.Tensor:
        """:meth:`pairwise` from the test batch's :meth:`held_test_factors`: (B_t, B)."""
        return self._compiled().pairwise_with(held, tuple(train_batch), rates)

    def squared_norms(self, batch: Tuple, rates: tf.Tensor) -> Optional[tf.Tensor]:
        """``Σ_k lr_k ||g_k(z)||²``: (B,), or None (see the class)."""
        batch = tuple(batch)
        if not self.usable(batch):
            return None
        return self._compiled().squared_norms(batch, rates)

    def gradients(self, batch: Tuple, scales: tf.Tensor) -> Optional[tf.Tensor]:
        """``[scales[0] g_1, ..., scales[K-1] g_K]`` in the layout of the checkpoints' per-sample gradients:
        (B, Σ_k P_k), or None (see the class)."""
        batch = tuple(batch)
        if not self.usable(batch):
            return None
        return self._compiled().gradients(batch, scales)


def factored_tracin_kernels(models: Sequence[Any]) -> Optional[FactoredTracInKernels]:
    """The factored products of a tuple of checkpoint models (their compiled functions belong to each model's
    ``layer_factors``, so new TracIn objects on the same checkpoints trace nothing); None if a model has none."""
    factors = [getattr(model, "layer_factors", None) for model in models]
    if any(not isinstance(factor, LayerFactorKernels) for factor in factors):
        return None
    return FactoredTracInKernels(factors)
