"""Representer Point Selection via Local Jacobian Expansion (Sui et al., NeurIPS 2021)."""
from typing import Any, Optional, Tuple, Union

import keras
import tensorflow as tf

from ..common.compat import renamed_arguments
from ..common.executor import Executor
from ..common.model_wrappers import InfluenceModel, assert_finite
from ..common.solver_registry import build_solver
from ..utils.tf_operations import assert_batched_dataset, first_batch_size, random_subset
from .base_representer_point import BaseRepresenterPoint


class RepresenterPointLJE(BaseRepresenterPoint):
    r"""Representer points from a local (first-order) expansion of the last layer's gradient (Sui et al. 2021).

    Let W (D × C) be the kernel of the trained last layer, ``g_i(W) = ∂ℓ_i/∂W`` the gradient of training sample
    i's loss (``ℓ_i = loss(y_i, head(z_i))``) and n the number of training samples.

    1. Perturb the head by one gradient-*ascent* step on the summed loss of the Hessian samples
       (as the reference): ``W' = W + η Σ_i g_i(W)`` (``η = perturbation_lr``).
    2. Expand the gradient around ``W'``: ``0 ≈ ḡ(W) ≈ ḡ(W') + H'(W - W')`` with ``H'`` the mean Hessian of the
       loss w.r.t. W at ``W'`` (pseudo-inverse ``H'⁺`` from the IHVP factory), hence
       ``W ≈ W' - H'⁺ ḡ(W') = Σ_i Θ_i`` with ``Θ_i = (W' - H'⁺ g_i(W')) / n`` (a D × C matrix per sample,
       IHVP applied to the row-major vectorised gradient).
    3. Write each ``Θ_i`` as a representer ``z_i alpha_iᵀ`` in the least-squares sense:
       ``alpha_i = Θ_iᵀ z_i / ||z_i||²`` (C,), i.e.

       ``alpha_i = (W'ᵀ z_i - (H'⁺ g_i(W'))ᵀ z_i) / (n ||z_i||²)``  (0 when ``z_i = 0``).

    Values and self-influence follow :class:`BaseRepresenterPoint`: ``alpha[i, pred(t)] <z_i, z_t>`` and
    ``|alpha[i, pred(i)]|`` with the original model's predicted class.

    Parameters
    ----------
    influence_model
        :class:`InfluenceModel` of the classifier (its Keras model must end with ``Dense(C, use_bias=False)``;
        only its model and loss are used: the watched weights are always the last layer's kernel).
    train_set
        Batched training dataset ``(x, y)`` (``dataset``, the reference's name, is accepted with a
        ``DeprecationWarning``).
    ihvp_calculator
        The IHVP solver on the perturbed head: a registered name (default ``"exact"``), a solver configuration, or
        a factory such as :class:`~deel.influenciae.common.ExactIHVPFactory` (``ihvp_calculator_factory``, the
        reference's name, is accepted with a ``DeprecationWarning``).
    n_samples_for_hessian
        Use this many training samples (drawn with ``seed``, as the influence calculators draw theirs) for the
        perturbation and the Hessian; all by default.
    target_layer
        Must designate the last layer (-1): the expansion is about the last layer only.
    shuffle_buffer_size
        Buffer of the shuffle that draws the Hessian subset.
    epsilon
        Norms ``||z_i||² <= epsilon²`` are treated as zero (alpha = 0).
    perturbation_lr
        η of the ascent step.
    seed
        Seed of the Hessian subset.
    """

    @renamed_arguments(ihvp_calculator_factory="ihvp_calculator", dataset="train_set")
    def __init__(self, influence_model: InfluenceModel, train_set: tf.data.Dataset, ihvp_calculator: Any = "exact",
                 n_samples_for_hessian: Optional[int] = None, target_layer: Union[int, str] = -1,
                 shuffle_buffer_size: int = 10000, epsilon: float = 1e-5, perturbation_lr: float = 1e-4,
                 seed: Optional[int] = 0):
        if not isinstance(influence_model, InfluenceModel):
            raise TypeError(f"influence_model must be an InfluenceModel, got {type(influence_model).__name__}.")
        model = influence_model.model
        if target_layer not in (-1, len(model.layers) - 1, model.layers[-1].name):
            raise ValueError(f"RepresenterPointLJE expands the last layer only: target_layer must be -1 (the last "
                             f"layer), got {target_layer!r}.")
        assert_batched_dataset(train_set, "train_set")
        super().__init__(model, train_set, influence_model.loss_function, -1, influence_model.strategy)
        self.process_batch_for_loss_fn = influence_model.process_batch_for_loss_fn
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epsilon = float(epsilon)
        self.perturbation_lr = float(perturbation_lr)
        features, labels, batch_size = self._feature_dataset_tensors()
        self.n_train = int(features.shape[0])
        self.hessian_dataset = random_subset(tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size),
                                             n_samples_for_hessian, seed, shuffle_buffer_size)
        self.perturbed_head = keras.models.clone_model(self.original_head)
        self.perturbed_head.set_weights(self.original_head.get_weights())
        self.head_model = InfluenceModel(self.perturbed_head, start_layer=-1, loss_function=self.loss_function,
                                         strategy=self.strategy)
        self._perturb_head()
        self.ihvp_calculator = build_solver("exact" if ihvp_calculator is None else ihvp_calculator,
                                            self.head_model, self.hessian_dataset)

    def _index_configuration(self) -> dict:
        """The perturbation's settings (the data it is computed on is not fingerprinted)."""
        return {"epsilon": self.epsilon, "perturbation_lr": self.perturbation_lr, "target_layer": self.target_layer}

    def _feature_dataset_tensors(self) -> Tuple[tf.Tensor, tf.Tensor, int]:
        """Features and labels of every training sample, and the first batch size."""
        def of_batch(batch: Tuple) -> Tuple[tf.Tensor, tf.Tensor]:
            inputs, targets, _ = self.process_batch_for_loss_fn(batch)
            return self._features(inputs), targets

        features, labels = Executor(strategy=self.strategy).concat(of_batch, self.train_set, name="train_set")
        return features, labels, first_batch_size(self.train_set)

    def _perturb_head(self) -> None:
        """``W' = W + η Σ_i g_i(W)`` over the Hessian samples."""
        total, _ = Executor(strategy=self.strategy).sum(self.head_model.batch_gradient_tensor, self.hessian_dataset)
        assert_finite(total, "gradients of the head")
        kernel = self.perturbed_head.layers[-1].kernel
        kernel.assign(kernel.value + tf.cast(self.perturbation_lr, kernel.dtype) * tf.reshape(total, kernel.shape))

    def _compute_alpha(self, z_batch: tf.Tensor, y_batch: tf.Tensor) -> tf.Tensor:
        """``alpha_i = (W'ᵀ z_i - (H'⁺ g_i(W'))ᵀ z_i) / (n ||z_i||²)``: (B, C)."""
        features = tf.cast(z_batch, self.head_model.dtype)
        gradients = self.head_model.batch_jacobian_tensor((features, y_batch))  # (B, D·C), row-major (d, c)
        corrections = tf.transpose(self.ihvp_calculator.solve(tf.transpose(gradients)))
        corrections = tf.reshape(tf.cast(corrections, features.dtype), (-1, tf.shape(features)[1], self.n_classes))
        perturbed_kernel = tf.cast(self.perturbed_head.layers[-1].kernel.value, features.dtype)
        numerator = tf.matmul(features, perturbed_kernel) - tf.einsum("bdc,bd->bc", corrections, features)
        sq_norms = tf.reduce_sum(tf.square(features), axis=1, keepdims=True)
        safe = sq_norms > self.epsilon ** 2
        denominator = tf.cast(self.n_train, features.dtype) * tf.where(safe, sq_norms, tf.ones_like(sq_norms))
        return tf.where(safe, numerator / denominator, tf.zeros_like(numerator))
