"""First-order influence functions (Koh & Liang 2017), RelatIF (Barshan et al. 2020), groups (Koh et al. 2019)."""
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from ..common.base_influence import BaseInfluenceCalculator
from ..common.compat import renamed_arguments
from ..common.ihvp_base import solver_description
from ..common.model_wrappers import InfluenceModel, assert_finite
from .base_group_influence import BaseGroupInfluenceCalculator


class FirstOrderInfluenceCalculator(BaseInfluenceCalculator, BaseGroupInfluenceCalculator):
    r"""Influence functions: how the loss on a test sample t changes when a training sample z is removed.

    With g(z) the gradient of z's per-sample loss w.r.t. the watched weights and H the mean Hessian of the
    training loss (``H + λI`` when ``regularization = λ``):

    * influence vector of z: ``v(z) = H⁻¹ g(z)`` (P,) — proportional to the parameter change when z is removed;
    * influence of z on t: ``I(t, z) = g(t)ᵀ H⁻¹ g(z)`` — no minus sign and no 1/n factor. **Positive**: removing
      z would *increase* the test loss (z is a proponent / helpful sample); negative: z is an opponent.
      Removing z changes the test loss by about ``I(t, z) / n``;
    * self-influence: ``I(z, z) = g(z)ᵀ H⁻¹ g(z)`` (≥ 0 for a positive semi-definite H);
    * ``normalize=True`` (RelatIF, θ-relative influence): ``v(z) = H⁻¹ g(z) / ||H⁻¹ g(z)||``, so
      ``I(t, z) = g(t)ᵀ H⁻¹ g(z) / ||H⁻¹ g(z)||``;
    * group U: ``v(U) = H⁻¹ Σ_{z∈U} g(z)`` (normalised by its norm with ``normalize``) and
      ``I(T, U) = (Σ_{t∈T} g(t))ᵀ v(U)``.

    Parameters
    ----------
    model
        The influence model.
    train_set
        Batched training dataset (the Hessian is the mean over it or over ``n_samples_for_hessian`` of it).
    ihvp_calculator
        Solver: ``'exact'`` (default), ``'cgd'``, ``'lissa'``, an IHVPCalculator member, class or instance.
    n_samples_for_hessian, shuffle_buffer_size, regularization, seed
        See :class:`~deel.influenciae.influence.BaseGroupInfluenceCalculator`.
    normalize
        RelatIF normalisation of the influence vectors.
    """

    @renamed_arguments(dataset="train_set")
    def __init__(self, model: InfluenceModel, train_set: tf.data.Dataset, ihvp_calculator: Any = "exact",
                 n_samples_for_hessian: Optional[int] = None, shuffle_buffer_size: int = 10000,
                 normalize: bool = False, regularization: float = 0.0, seed: Optional[int] = 0):
        BaseGroupInfluenceCalculator.__init__(self, model, train_set, ihvp_calculator, n_samples_for_hessian,
                                              shuffle_buffer_size, regularization, seed)
        self.normalize = bool(normalize)

    def _index_configuration(self) -> dict:
        """RelatIF's normalisation and the solver's settings (what the influence vectors depend on besides the
        weights; the curvature's data is not fingerprinted)."""
        return {"normalize": self.normalize, **solver_description(self.ihvp_calculator)}

    def _normalized(self, vectors: tf.Tensor, axis: int) -> tf.Tensor:
        if not self.normalize:
            return vectors
        return tf.math.divide_no_nan(vectors, tf.norm(vectors, axis=axis, keepdims=True))

    def _gradients_and_vectors(self, train_samples: Tuple) -> Tuple[tf.Tensor, tf.Tensor]:
        gradients = self.model.batch_jacobian_tensor(train_samples)
        vectors = tf.transpose(self.ihvp_calculator.solve(tf.transpose(gradients)))
        return gradients, self._normalized(vectors, axis=1)

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        """``H⁻¹ g(z)`` for every sample of the batch (normalised with RelatIF): (B, P)."""
        return self._gradients_and_vectors(train_samples)[1]

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        """Per-sample gradients of the samples to evaluate: (B, P)."""
        return self.model.batch_jacobian_tensor(samples)

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        """``g(t)ᵀ v(z)`` for every pair: (B_t, B_tr)."""
        return tf.matmul(preproc_test_sample, tf.cast(influence_vector, preproc_test_sample.dtype), transpose_b=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``g(z)ᵀ v(z)``: (B, 1); gradients are computed once. Without RelatIF this is the
        solver's inverse quadratic form ``g(z)ᵀ (H + λI)⁻¹ g(z)`` (one triangular solve for a Cholesky factor)."""
        if not self.normalize:
            return self.ihvp_calculator.batch_quadratic_form(train_samples)[:, None]
        gradients, vectors = self._gradients_and_vectors(train_samples)
        return tf.reduce_sum(gradients * vectors, axis=1, keepdims=True)

    def _test_side_bytes_per_sample(self) -> int:
        """P numbers per test sample: the test side of a whole chunk is solved at once."""
        return self.model.nb_params * self.model.dtype.size

    def _streamed_test_side(self, batches: List[Tuple]) -> tf.Tensor:
        """Without RelatIF, the solver is applied to the test side, ``(H + λI)⁻¹ g(t)``: (T, P), so that streaming
        the training set only needs its gradients (no solve per training sample); with RelatIF, ``g(t)``."""
        gradients = tf.concat([self.model.batch_jacobian_tensor(batch) for batch in batches], axis=0)
        if self.normalize:
            return gradients
        return tf.cast(tf.transpose(self.ihvp_calculator.solve(tf.transpose(gradients))), gradients.dtype)

    def _streamed_block(self, test_side: tf.Tensor, train_batch: Tuple) -> tf.Tensor:
        """``g(t)ᵀ (H + λI)⁻¹ g(z)`` for the held test side and one training batch: (T, B)."""
        if self.normalize:
            return super()._streamed_block(test_side, train_batch)
        gradients = self.model.batch_jacobian_tensor(train_batch)
        return tf.matmul(test_side, tf.cast(gradients, test_side.dtype), transpose_b=True)

    def _pairwise_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        """All pairwise values ``g(t)ᵀ (H + λI)⁻¹ g(z)`` as one matrix (N_test, N_train).

        The value is symmetric in t and z, so the solver is applied to whichever set has fewer samples (the test
        side when ``N_test <= N_train``) and the other one is streamed. With RelatIF (``normalize=True``) the
        training-side vectors are needed for their norms, so the test side is held and the training side solved.

        Raises
        ------
        ValueError
            If a value is not finite or a dataset is empty.
        """
        if self.normalize:
            return super()._pairwise_matrix(dataset_to_evaluate, train_set)
        return self._streamed_symmetric_matrix(dataset_to_evaluate, train_set)

    # Groups -------------------------------------------------------------------------------------
    def _group_gradient(self, group: tf.data.Dataset) -> tf.Tensor:
        """Σ g(z) over a group: (P,)."""
        return tf.reduce_sum(self.model.batch_gradient(group), axis=0)

    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """Influence vector of a group, ``H⁻¹ Σ_{z∈U} g(z)`` (normalised with RelatIF): (1, P)."""
        vector = tf.transpose(self.ihvp_calculator.solve(self._group_gradient(group_train)[:, None]))
        vector = self._normalized(vector, axis=1)
        assert_finite(vector, "group influence vector")
        return vector

    def estimate_influence_values_group(self, group_train: tf.data.Dataset,
                                        group_to_evaluate: Optional[tf.data.Dataset] = None) -> tf.Tensor:
        """Influence of the group ``group_train`` on ``group_to_evaluate`` (itself by default): (1, 1).

        ``(Σ_{t} g(t))ᵀ H⁻¹ Σ_{z} g(z)``; both groups must hold the same number of samples.
        """
        if group_to_evaluate is None:
            group_to_evaluate = group_train
        self.assert_compatible_datasets(group_train, group_to_evaluate)
        vector = self.compute_influence_vector_group(group_train)
        evaluate_gradient = self._group_gradient(group_to_evaluate)[None, :]
        return tf.matmul(evaluate_gradient, tf.cast(vector, evaluate_gradient.dtype), transpose_b=True)
