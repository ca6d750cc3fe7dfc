"""The interface of inverse-Hessian-vector-product (IHVP) solvers, and their compact low-rank form.

A solver sees a curvature operator (:mod:`.curvature`) and vectors, nothing else: an explicit :meth:`fit` stage
(the constructors run it, for compatibility), ``solve``/``apply_inverse`` ``(H + λI)⁻¹ V``, the quadratic form
``vᵀ (H + λI)⁻¹ v`` and, when it has one, a :class:`LowRankInverse`. Vectors are laid out as columns: a batch of
B vectors is a (P, B) tensor.
"""
import copy
from abc import ABC, abstractmethod
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..utils.tf_operations import assert_batched_dataset, assert_known_cardinality, lazy_map
from .model_wrappers import BaseInfluenceModel


def check_regularization(regularization: float) -> float:
    """λ as a float; ``ValueError`` unless it is finite and >= 0."""
    regularization = float(regularization)
    if regularization < 0 or not np.isfinite(regularization):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
    return regularization


def solver_description(solver: Any) -> Dict[str, Any]:
    """The settings of a solver that an influence index fingerprints: its class, λ and, when it has them, its
    damping heuristic, Fisher kind and curvature (JSON-serialisable)."""
    description: Dict[str, Any] = {"solver": type(solver).__qualname__}
    for name in ("regularization", "damping_heuristic", "fisher", "curvature"):
        value = getattr(solver, name, None)
        if isinstance(value, (bool, int, float, str)):
            description[name] = value
    return description


def default_rcond(nb_params: int, dtype: tf.DType) -> float:
    """Relative cut-off of small eigenvalues: ``10 · P · eps(dtype)`` (numpy/TF ``pinv``)."""
    return 10.0 * nb_params * float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)  # pylint: disable=no-member


class LowRankInverse(NamedTuple):
    """An inverse applied as ``Gᵀ diag(s) G``: ``G`` (k, P) orthonormal rows, ``s`` (k,).

    Attributes
    ----------
    basis : tf.Tensor
        G (k, P).
    inverse_values : tf.Tensor
        s (k,), e.g. ``1 / (λ_j + λ_reg)`` (0 for dropped directions).
    values : tf.Tensor
        (k,) the curvature's eigenvalues on the basis (undamped).
    """

    basis: tf.Tensor
    inverse_values: tf.Tensor
    values: tf.Tensor

    def project(self, rows: tf.Tensor) -> tf.Tensor:
        """Coordinates on the basis, ``V Gᵀ``: rows (B, P) -> (B, k)."""
        return tf.matmul(tf.cast(rows, self.basis.dtype), self.basis, transpose_b=True)


class InverseHessianVectorProduct(ABC):
    """Base class of the IHVP solvers.

    Parameters
    ----------
    model
        The influence model (watched weights, loss).
    train_dataset
        Batched dataset of ``(x, y)`` over which the mean Hessian is taken (optional for solvers that receive
        the Hessian otherwise).
    """

    def __init__(self, model: BaseInfluenceModel, train_dataset: Optional[tf.data.Dataset]):
        if not isinstance(model, BaseInfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        self.model = model
        self.train_set = train_dataset
        self.cardinality = None
        self._fitted = False
        if train_dataset is not None:
            assert_batched_dataset(train_dataset, "train_dataset")
            self.cardinality = assert_known_cardinality(train_dataset, "train_dataset")

    # Fit stage ----------------------------------------------------------------------------------
    def fit(self) -> "InverseHessianVectorProduct":
        """Do the solver's expensive, once-per-training-set work (build and factorise H, run the Arnoldi
        iteration, cache the head's inputs); idempotent. Constructors call it unless ``fit_now=False``; the
        products call it when needed. Returns the solver."""
        if not self._fitted:
            self._fit()
            self._fitted = True
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self._fitted

    def _fit(self) -> None:
        """Solver-specific fit (nothing by default)."""

    def with_regularization(self, regularization: float) -> "InverseHessianVectorProduct":
        """The same solver for ``H + λ'I``, reusing what the fit computed that does not depend on λ.

        Sweeping the damping (:func:`deel.influenciae.evaluation.select_damping`) then costs one curvature fit:
        the exact solver keeps the mean Hessian and only refactorises ``H + λ'I`` (no pass over the data), Arnoldi
        keeps its Ritz pairs (no Hessian-vector product at all), the iterative solvers keep their cached inputs.
        This solver is left unchanged.

        Parameters
        ----------
        regularization
            λ' ≥ 0.

        Returns
        -------
        InverseHessianVectorProduct
            A new solver of the same class (fitted when this one is).
        """
        twin = copy.copy(self)
        twin.regularization = check_regularization(regularization)  # pylint: disable=attribute-defined-outside-init
        twin._redamp()  # pylint: disable=protected-access
        return twin

    def _redamp(self) -> None:
        """Hook run on the copy made by :meth:`with_regularization` once its ``regularization`` is set: rebuild
        what depends on λ (default: nothing)."""

    def low_rank(self) -> Optional[LowRankInverse]:
        """The solver's inverse as ``Gᵀ diag(s) G`` when it has that compact form (Arnoldi), else None: calculators
        use it to work in k dimensions without knowing which solver it is."""
        return None

    def solve(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI)⁻¹ V`` for vectors given as columns: (P, K) -> (P, K) (fits first if needed)."""
        self.fit()
        return self.apply_inverse(vectors)

    def quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (H + λI)⁻¹ v`` for every column of (P, K) vectors: (K,) (fits first if needed)."""
        self.fit()
        return self.inverse_quadratic_form(vectors)

    def batch_quadratic_form(self, batch: Tuple) -> tf.Tensor:
        """``g(z)ᵀ (H + λI)⁻¹ g(z)`` for every sample z of a batch of ``(x, y)``: (B,) (self-influence). From the
        per-sample gradients by default; solvers with a cheaper form (K-FAC) override it."""
        self.fit()
        return self.inverse_quadratic_form(tf.transpose(self.model.batch_jacobian_tensor(batch)))

    # Hooks ---------------------------------------------------------------------------------------
    @abstractmethod
    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """Return ``(H + λI)⁻¹ V`` for vectors given as columns: (P, K) -> (P, K)."""

    @abstractmethod
    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        """Return ``H V`` (mean Hessian, undamped) for vectors given as columns: (P, K) -> (P, K)."""

    def inverse_quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (H + λI)⁻¹ v`` for every column of (P, K) vectors: (K,)."""
        vectors = tf.cast(vectors, self.model.dtype)
        return tf.reduce_sum(vectors * tf.cast(self.apply_inverse(vectors), vectors.dtype), axis=0)

    # Generic API ----------------------------------------------------------------------------------
    def _vectors_of(self, group_batch: Tuple, use_gradient: bool) -> tf.Tensor:
        """(B, P) vectors of a batch: per-sample gradients, or the batch's first element itself."""
        if use_gradient:
            return self.model.batch_jacobian_tensor(group_batch)
        vectors = group_batch[0] if isinstance(group_batch, (tuple, list)) else group_batch
        return tf.cast(vectors, self.model.dtype)

    def _compute_ihvp_single_batch(self, group_batch: Tuple, use_gradient: bool = True) -> tf.Tensor:
        """``(H + λI)⁻¹ Gᵀ`` for one batch: (P, B) (one column per sample)."""
        return self.apply_inverse(tf.transpose(self._vectors_of(group_batch, use_gradient)))

    def _compute_hvp_single_batch(self, group_batch: Tuple, use_gradient: bool = True) -> tf.Tensor:
        """``H Gᵀ`` for one batch: (P, B)."""
        return self.apply_hessian(tf.transpose(self._vectors_of(group_batch, use_gradient)))

    def compute_ihvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """Inverse-Hessian-vector products of every batch of ``group``.

        Parameters
        ----------
        group
            Batched dataset of ``(x, y)`` samples (``use_gradient=True``: their per-sample gradients are used) or
            of ``(v,)`` tuples of (B, P) vectors (``use_gradient=False``).

        Returns
        -------
        tf.data.Dataset
            One (P, B) tensor per batch.
        """
        assert_batched_dataset(group, "group")
        return lazy_map(group, lambda *batch: self._compute_ihvp_single_batch(batch, use_gradient))

    def compute_hvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """Hessian-vector products of every batch of ``group``: one (P, B) tensor per batch."""
        assert_batched_dataset(group, "group")
        return lazy_map(group, lambda *batch: self._compute_hvp_single_batch(batch, use_gradient))
