r"""Arnoldi influence functions (Schioppa et al. 2022): influence in the k-dimensional dominant eigenspace of H."""
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from ..common.arnoldi_ihvp import ArnoldiIHVP
from ..common.base_influence import BaseInfluenceCalculator
from ..common.compat import renamed_arguments
from ..common.ihvp_base import LowRankInverse, solver_description
from ..common.model_wrappers import InfluenceModel


class ArnoldiInfluenceCalculator(BaseInfluenceCalculator):
    r"""Influence functions computed on the k dominant Ritz pairs of the mean Hessian (Schioppa et al. 2022).

    The Arnoldi iteration (:class:`~deel.influenciae.common.ArnoldiIHVP`) finds k Ritz pairs ``(λ_j, G_j)`` of the
    mean Hessian H over ``train_dataset`` (the eigenvalues of **largest** magnitude; ``G`` (k, P) has the Ritz
    vectors as rows), so that ``H⁻¹ ≈ Gᵀ diag(1/λ) G`` with ``λ_j → λ_j + λ_reg`` when ``regularization = λ_reg``.
    Everything then happens in the projected k-dimensional space:

    * test-side representation: ``p(t) = G g(t)`` (k,);
    * influence vector of a training sample: ``v(z) = diag(1/λ) G g(z)`` (k,) — not (P,);
    * influence of z on t: ``I(t, z) = p(t)ᵀ v(z) = Σ_j (g(t)·G_j)(g(z)·G_j)/λ_j ≈ g(t)ᵀ H⁻¹ g(z)``, with the
      sign convention of :class:`FirstOrderInfluenceCalculator` (positive: removing z increases the loss on t);
    * self-influence: ``Σ_j (g(z)·G_j)² / λ_j``.

    With ``subspace_dim = k = P`` the values equal the exact first-order ones.

    Parameters
    ----------
    model
        The influence model (watched weights, per-sample loss).
    train_set
        Batched, finite dataset over which the mean Hessian is taken (held in memory during the iteration).
    subspace_dim
        m, dimension of the Krylov space (m mean-HVP passes over the dataset), 1 ≤ m ≤ P.
    force_hermitian
        Symmetrise the projected matrix and use the symmetric eigensolver (recommended).
    k_largest_eig_vals
        k, number of Ritz pairs kept, 1 ≤ k ≤ m.
    dtype
        dtype of ``eig_vals``, ``G``, the influence vectors and the values.
    regularization
        λ_reg ≥ 0 added to every kept eigenvalue.
    seed
        Seed of the random start vector (default 0; ``None``: TensorFlow's global random state).
    hvp_batch_size
        Samples per chunk of the Hessian-vector-product passes.

    Attributes
    ----------
    eig_vals : tf.Tensor
        (k,) kept Ritz values (without regularization), by decreasing magnitude.
    G : tf.Tensor
        (k, P) kept Ritz vectors as rows.
    ihvp_calculator : ArnoldiIHVP
        The underlying solver.

    Raises
    ------
    ValueError
        ``subspace_dim > P``, ``k_largest_eig_vals > subspace_dim``, or a value < 1.
    """

    @renamed_arguments(train_dataset="train_set")
    def __init__(self, model: InfluenceModel, train_set: tf.data.Dataset, subspace_dim: int,
                 force_hermitian: bool, k_largest_eig_vals: int, dtype: tf.DType = tf.float32,
                 regularization: float = 0.0, seed: Optional[int] = 0, hvp_batch_size: Optional[int] = None):
        self.model = model
        self.train_set = train_set
        self.subspace_dim = subspace_dim
        self.force_hermitian = bool(force_hermitian)
        self.k_largest_eig_vals = k_largest_eig_vals
        self.dtype = tf.as_dtype(dtype)
        self.ihvp_calculator = ArnoldiIHVP(model, train_set, subspace_dim, k_largest_eig_vals, force_hermitian,
                                           regularization=regularization, seed=seed, hvp_batch_size=hvp_batch_size,
                                           dtype=self.dtype)

    @property
    def low_rank(self) -> LowRankInverse:
        """The solver's inverse in its compact form ``Gᵀ diag(1/(λ + λ_reg)) G``."""
        return self.ihvp_calculator.low_rank()

    @property
    def eig_vals(self) -> tf.Tensor:
        """Kept Ritz values λ_j (k,), by decreasing magnitude."""
        return self.low_rank.values

    @property
    def G(self) -> tf.Tensor:  # pylint: disable=invalid-name
        """Kept Ritz vectors as rows (k, P)."""
        return self.low_rank.basis

    def arnoldi(self, dim: int) -> Tuple[np.ndarray, np.ndarray]:
        """Run a fresh Arnoldi iteration (new random start vector) in dimension ``dim`` = P.

        Returns
        -------
        eig_vals, G
            float64 arrays (k,) and (k, P); the calculator's own eigenpairs are not changed.
        """
        return self.ihvp_calculator.arnoldi(dim)

    def _index_configuration(self) -> dict:
        """The Krylov and eigenvalue settings and λ (what the vectors depend on besides the weights)."""
        return {"subspace_dim": int(self.subspace_dim), "k_largest_eig_vals": int(self.k_largest_eig_vals),
                "force_hermitian": self.force_hermitian, **solver_description(self.ihvp_calculator)}

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        """``G g(t)`` for every sample: (B, k)."""
        return self.low_rank.project(self.model.batch_jacobian_tensor(samples))

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        """``diag(1/λ) G g(z)`` for every sample: (B, k)."""
        return self._preprocess_samples(train_samples) * self.low_rank.inverse_values[None, :]

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        """``p(t)ᵀ v(z)`` for every pair: (B_t, B_tr)."""
        return tf.matmul(preproc_test_sample, tf.cast(influence_vector, preproc_test_sample.dtype), transpose_b=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``Σ_j (g(z)·G_j)² / λ_j``: (B, 1)."""
        coordinates = self._preprocess_samples(train_samples)
        return tf.reduce_sum(tf.square(coordinates) * self.low_rank.inverse_values[None, :], axis=1,
                             keepdims=True)
