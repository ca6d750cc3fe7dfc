"""Shared constructor of the influence-function calculators: hessian dataset and IHVP solver."""
from abc import ABC, abstractmethod
from typing import Any, Optional

import tensorflow as tf

from ..common.inverse_hessian_vector_product import build_ihvp
from ..common.model_wrappers import InfluenceModel
from ..utils.tf_operations import assert_batched_dataset, dataset_size


class BaseGroupInfluenceCalculator(ABC):
    """Influence of groups of training samples, with a solver for ``(H + λI)⁻¹ v``.

    The group value ``I(T, U)`` estimates how removing the training group U changes the loss on the group T
    (U itself by default). Sign convention: **positive means removing U would increase the loss on T** (U is
    helpful to T). H is the mean Hessian of the per-sample training loss over the hessian dataset.

    Parameters
    ----------
    model
        The influence model (watched weights and per-sample loss).
    dataset
        Batched training dataset; the mean Hessian is taken over it (or over a random subset of it).
    ihvp_calculator
        ``'exact'``, ``'cgd'``, ``'lissa'``, an :class:`~deel.influenciae.common.IHVPCalculator` member, an
        :class:`~deel.influenciae.common.InverseHessianVectorProduct` subclass (built with defaults) or a
        ready instance (then ``n_samples_for_hessian``, ``shuffle_buffer_size`` and ``regularization`` are not
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

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset, ihvp_calculator: Any = "exact",
                 n_samples_for_hessian: Optional[int] = None, shuffle_buffer_size: int = 10000,
                 regularization: float = 0.0, seed: Optional[int] = 0):
        assert_batched_dataset(dataset, "dataset")
        self.model = model
        if n_samples_for_hessian is None:
            hessian_set = dataset
        else:
            if int(n_samples_for_hessian) < 1:
                raise ValueError(f"n_samples_for_hessian must be >= 1, got {n_samples_for_hessian}.")
            batch_size = int(next(iter(dataset.map(lambda *batch: tf.shape(tf.nest.flatten(batch)[0])[0]))))
            taken = min(int(n_samples_for_hessian), dataset_size(dataset))
            hessian_set = (dataset.unbatch().shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=False)
                           .take(taken).batch(batch_size)
                           .apply(tf.data.experimental.assert_cardinality(-(-taken // batch_size))))
        self.train_set = hessian_set
        self.ihvp_calculator = build_ihvp(ihvp_calculator, model, hessian_set, regularization)

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
