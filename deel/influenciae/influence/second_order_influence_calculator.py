r"""Second-order group influence functions (Basu, You & Feizi 2020, "On second-order group influence functions")."""
from typing import Any, Optional, Tuple

import tensorflow as tf

from ..common.compat import renamed_arguments
from ..common.model_wrappers import InfluenceModel, assert_finite
from ..common.executor import EmptyDatasetError, Executor
from ..utils.tf_operations import assert_batched_dataset, dataset_size
from .base_group_influence import BaseGroupInfluenceCalculator


class SecondOrderInfluenceCalculator(BaseGroupInfluenceCalculator):
    r"""Influence of removing a whole group U of training samples, to second order in the group (Basu et al. 2020).

    Notation: n the number of samples of ``train_set``, ``m = |U|``, ``p = m / n`` (must be < 1), g(z) the gradient of
    z's per-sample loss w.r.t. the watched weights, ``H`` the mean Hessian of the training loss (``H + λI`` with
    ``regularization = λ``) and ``H_U = Σ_{u∈U} ∇²ℓ_u`` the *summed* loss Hessian over the group (computed with
    Hessian-vector products over U, batch-wise; no regularization: the removed samples do not carry the prior).

    * additive term ``A = H⁻¹ Σ_{z∈U} g(z)`` (P,), the first-order group influence vector of
      :class:`FirstOrderInfluenceCalculator`;
    * pairwise term ``Π = H⁻¹ H_U H⁻¹ Σ_{z∈U} g(z) = H⁻¹ H_U A`` (P,): the interactions between the samples of U;
    * group influence vector (SPEC §3.12, Basu et al.)

      .. math::

          I(U) = \frac{1 - 2p}{(1 - p)^2\, n} A + \frac{1}{(1 - p)^2\, n^2} Π .

    **Scale and meaning.** ``I(U)`` approximates the *parameter change* ``θ_{S∖U} − θ*`` caused by removing U and
    retraining (it already carries the 1/n factors): removing U from ``J(θ) = 1/n Σ_i ℓ_i(θ) + λ/2 ||θ||²`` moves the
    optimum by ``(nH − H_U)⁻¹ Σ_U g = A/n + Π/n² + O(p³)`` (third derivatives neglected), whose two leading terms
    are Basu's coefficients at ``p → 0``. The group value ``(Σ_{t∈T} g(t))ᵀ I(U)`` is therefore the predicted change
    of the **summed** loss over T when U is removed (positive: removing U increases the loss on T), on the scale of
    an actual retraining — whereas :meth:`FirstOrderInfluenceCalculator.estimate_influence_values_group` returns
    ``(Σ_T g)ᵀ A``, which is n times its predicted change.

    Parameters
    ----------
    model
        The influence model.
    train_set
        Batched training dataset; n is its number of samples (a short last batch is counted correctly).
    ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, regularization, seed
        See :class:`~deel.influenciae.influence.BaseGroupInfluenceCalculator` (``'exact'``, ``'cgd'``, ``'lissa'``,
        a member, a class or an instance such as :class:`~deel.influenciae.common.ArnoldiIHVP`).

    Attributes
    ----------
    train_size : int
        n.
    """

    @renamed_arguments(dataset="train_set")
    def __init__(self, model: InfluenceModel, train_set: tf.data.Dataset, ihvp_calculator: Any = "exact",
                 n_samples_for_hessian: Optional[int] = None, shuffle_buffer_size: int = 10000,
                 regularization: float = 0.0, seed: Optional[int] = 0):
        super().__init__(model, train_set, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, regularization,
                         seed)
        self.train_size = dataset_size(train_set)

    def _group_gradient(self, group: tf.data.Dataset) -> Tuple[tf.Tensor, int]:
        """``Σ_{z∈U} g(z)`` (P,) and m = |U| (batches may differ in size)."""
        assert_batched_dataset(group, "group")
        total, size = _group_sum(self.model.batch_gradient_tensor, group, self.model.strategy)
        assert_finite(total, "group gradient")
        return total, size

    def _group_fraction(self, size: int) -> float:
        """p = m / n, checked to be < 1."""
        if size >= self.train_size:
            raise ValueError(f"The group holds {size} samples, as many as or more than the training set "
                             f"({self.train_size}): p = |U|/n = {size / self.train_size:.3g} >= 1 and the second-order "
                             "coefficients 1/(1-p)² diverge. Remove a strict subset of the training set.")
        return size / self.train_size

    def _compute_additive_term(self, group: tf.data.Dataset) -> tf.Tensor:
        """``A = H⁻¹ Σ_{z∈U} g(z)``: (P, 1)."""
        gradient, _ = self._group_gradient(group)
        return self.ihvp_calculator.solve(gradient[:, None])

    def _compute_pairwise_interactions(self, group: tf.data.Dataset, additive_term: tf.Tensor) -> tf.Tensor:
        """``Π = H⁻¹ (Σ_{u∈U} ∇²ℓ_u) A``: (P, 1), the Hessian of U applied batch-wise (summed HVPs)."""
        group_hvp, _ = _group_sum(lambda batch: self.model.batch_hvp_tensor(batch, additive_term), group,
                                  self.model.strategy)
        return self.ihvp_calculator.solve(group_hvp)

    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """Second-order influence vector of the group, ``I(U)`` ≈ ``θ_{S∖U} − θ*``: (1, P).

        Raises
        ------
        ValueError
            If the group is empty or not smaller than the training set (p ≥ 1).
        """
        gradient, size = self._group_gradient(group_train)
        fraction = self._group_fraction(size)
        additive = self.ihvp_calculator.solve(gradient[:, None])
        pairwise = self._compute_pairwise_interactions(group_train, additive)
        n = float(self.train_size)
        additive_coefficient = (1.0 - 2.0 * fraction) / ((1.0 - fraction) ** 2 * n)
        pairwise_coefficient = 1.0 / ((1.0 - fraction) ** 2 * n ** 2)
        pairwise = tf.cast(pairwise, additive.dtype)
        vector = tf.transpose(additive_coefficient * additive + pairwise_coefficient * pairwise)
        assert_finite(vector, "second-order group influence vector")
        return vector

    def estimate_influence_values_group(self, group_train: tf.data.Dataset,
                                        group_to_evaluate: Optional[tf.data.Dataset] = None) -> tf.Tensor:
        """Influence of removing ``group_train`` on ``group_to_evaluate`` (itself by default): (1, 1).

        ``(Σ_{t∈T} g(t))ᵀ I(U)``: the predicted change of the summed loss over T when U is removed. Both groups must
        hold the same number of samples (as in the reference).

        Raises
        ------
        ValueError
            Groups of different sizes, or a group not smaller than the training set.
        """
        evaluated = group_train if group_to_evaluate is None else group_to_evaluate
        self.assert_compatible_datasets(group_train, evaluated)
        evaluate_gradient = self._group_gradient(evaluated)[0][None, :]
        influence_vector = self.compute_influence_vector_group(group_train)
        return tf.matmul(evaluate_gradient, tf.cast(influence_vector, evaluate_gradient.dtype), transpose_b=True)


def _group_sum(function: Any, group: tf.data.Dataset, strategy: Optional[tf.distribute.Strategy] = None
               ) -> Tuple[tf.Tensor, int]:
    """``(Σ_batches function(batch), |U|)`` over a group (under ``strategy``); ``ValueError`` when it is empty."""
    try:
        return Executor(strategy=strategy).sum(function, group)
    except EmptyDatasetError as error:
        raise EmptyDatasetError("The group is empty.") from error
