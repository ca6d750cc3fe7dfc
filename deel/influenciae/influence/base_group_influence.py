"""Shared constructor of the influence-function calculators: hessian dataset and IHVP solver."""
from abc import ABC, abstractmethod
from typing import Any, Optional

import tensorflow as tf

from ..common.compat import renamed_arguments
from ..common.solver_registry import build_solver
from ..common.model_wrappers import InfluenceModel
from ..utils.tf_operations import assert_batched_dataset, dataset_size, random_subset


class BaseGroupInfluenceCalculator(ABC):
    """Influence of groups of training samples, with a solver for ``(H + λI)⁻¹ v``.

    The group value ``I(T, U)`` estimates how removing the training group U changes the loss on the group T
    (U itself by default). Sign convention: **positive means removing U would increase the loss on T** (U is
    helpful to T). H is the mean Hessian of the per-sample training loss over the hessian dataset.

    Parameters
    ----------
    model
        The influence model (watched weights and per-sample loss).
    train_set
        Batched training dataset; the mean Hessian is taken over it (or over a random subset of it). (``dataset``,
        the reference's name, is accepted with a ``DeprecationWarning``.)
    ihvp_calculator
        A registered solver name (``'exact'``, ``'cgd'``, ``'lissa'``, ``'arnoldi'``, see
        :func:`~deel.influenciae.common.registered_solvers`), a solver configuration (e.g.
        ``ConjugateGradientConfig(regularization=1e-3, n_opt_iters=50)``, which keeps its own regularization), an
        :class:`~deel.influenciae.common.IHVPCalculator` member, an
        :class:`~deel.influenciae.common.InverseHessianVectorProduct` subclass (built with defaults), a factory, or
        a ready instance (then ``n_samples_for_hessian``, ``shuffle_buffer_size`` and ``regularization`` are not
        used).
    n_samples_for_hessian
        If given, the Hessian is taken over this many samples drawn at random from ``dataset``.
    shuffle_buffer_size
        Buffer of the shuffle that draws those samples.
    regularization
        λ ≥ 0: the solvers built here invert ``H + λI``.
    seed
        Seed of the draw of the hessian samples.
    """

    @renamed_arguments(dataset="train_set")
    def __init__(self, model: InfluenceModel, train_set: tf.data.Dataset, ihvp_calculator: Any = "exact",
                 n_samples_for_hessian: Optional[int] = None, shuffle_buffer_size: int = 10000,
                 regularization: float = 0.0, seed: Optional[int] = 0):
        assert_batched_dataset(train_set, "train_set")
        self.model = model
        hessian_set = random_subset(train_set, n_samples_for_hessian, seed, shuffle_buffer_size)
        self.train_set = hessian_set
        self.ihvp_calculator = build_solver(ihvp_calculator, model, hessian_set, regularization)

    @abstractmethod
    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """Influence vector of a whole group of training samples: (1, D)."""

    @abstractmethod
    def estimate_influence_values_group(self, group_train: tf.data.Dataset,
                                        group_to_evaluate: Optional[tf.data.Dataset] = None) -> tf.Tensor:
        """Influence of a group of training samples on a group to evaluate (itself by default): (1, 1)."""

    @staticmethod
    def assert_compatible_datasets(group_train: tf.data.Dataset, group_to_evaluate: tf.data.Dataset) -> int:
        """Check that both groups hold the same number of samples and return it.

        Raises
        ------
        ValueError
            "The amount of points in the train and evaluation groups must match." when they differ.
        """
        train_size = dataset_size(group_train)
        evaluate_size = dataset_size(group_to_evaluate)
        if train_size != evaluate_size:
            raise ValueError("The amount of points in the train and evaluation groups must match "
                             f"(group_train has {train_size}, group_to_evaluate has {evaluate_size}).")
        return train_size
