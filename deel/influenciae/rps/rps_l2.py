"""Representer Point Selection with an L2-regularised last layer (Yeh et al. 2018)."""
from typing import Callable, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from ..utils.backtracking_line_search import BacktrackingLineSearch
from ..utils.conjugate_gradients import conjugate_gradients_solve
from ..common.derivatives import gradient_of, hessian_vector_products
from ..common.executor import Executor
from ..utils.tf_operations import assert_batched_dataset
from .base_representer_point import BaseRepresenterPoint

_PROBABILISTIC_LOSSES = (keras.losses.CategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy,
                         keras.losses.BinaryCrossentropy, keras.losses.KLDivergence,
                         keras.losses.CategoricalFocalCrossentropy, keras.losses.BinaryFocalCrossentropy)


def squared_logit_distance(target_logits: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-sample ``||logits - target_logits||²`` summed over the classes: (B,)."""
    return tf.reduce_sum(tf.square(logits - tf.cast(target_logits, logits.dtype)), axis=-1)


class RepresenterPointL2(BaseRepresenterPoint):
    r"""Representer Point Selection (Yeh et al. 2018): refit the last layer with an L2 penalty.

    With ``z_i`` the features of the n training samples (input of the last Dense layer, or of ``layer_index``), a
    bias-free linear surrogate ``Φ(z) = z W`` (W: D × C) is trained in float64 on

        ``J(W) = (1/n) Σ_i L_i(z_i W) + λ ||W||²``

    where the per-sample loss ``L_i`` depends on ``surrogate_target``:

    * ``"labels"`` (default, the paper's equation): ``L_i(Φ) = loss_function(y_i, σ(Φ))`` with the training
      labels ``y_i`` and σ the activation of the model's last layer (so the loss sees what it saw in training);
    * ``"logits"`` (the reference's target): ``L_i(Φ) = loss_function(T_i, Φ)`` with ``T_i`` the original model's
      logits (pre-activation outputs of its last layer); ``loss_function=None`` is the squared distance
      ``||Φ - T_i||²``. The labels are then not used.

    Training is line-search gradient descent (:class:`~deel.influenciae.utils.BacktrackingLineSearch`, full batch,
    ``epochs`` steps) followed by Newton–conjugate-gradient steps until the gradient vanishes. At that stationary
    point the representer theorem holds exactly:

        ``W = Σ_i z_iᵀ alpha_i``, ``alpha_ic = -1/(2 λ n) · ∂L_i/∂Φ_c |_{Φ = z_i W}``,

    so every surrogate logit decomposes over the training samples: ``Φ_c(z_t) = Σ_i alpha[i, c] <z_i, z_t>``.
    Values and self-influence follow :class:`BaseRepresenterPoint` (``alpha[i, pred(t)] <z_i, z_t>`` and
    ``|alpha[i, pred(i)]|``, pred by the original model).

    Parameters
    ----------
    model
        Classifier whose last layer is ``Dense(C, use_bias=False)``; copied, never modified.
    train_set
        Batched training dataset ``(x, y)``.
    loss_function
        Per-sample (un-reduced) loss. With ``"labels"``: the training loss ``f(y_true, y_pred)`` (required; build
        Keras losses with ``dtype="float64"`` for full precision). With ``"logits"``:
        ``f(target_logits (B, C), surrogate_logits (B, C)) -> (B,)``, None for the squared distance;
        probabilistic losses (cross-entropies, KL) are rejected there since both sides are logits.
    lambda_regularization
        λ > 0 of the L2 penalty.
    scaling_factor
        Armijo constant of the line search.
    epochs
        Line-search gradient steps (full batch) before the Newton refinement.
    layer_index
        The features are the input of this layer (default -1: the last Dense layer).
    surrogate_target
        ``"labels"`` or ``"logits"`` (see above).
    newton_iterations
        Cap on the Newton–CG refinement steps (0 disables them).
    gradient_tolerance
        Stop when ``||∇J|| <= gradient_tolerance · 2 λ ||W||`` (relative error of the representer theorem).
    strategy
        The ``tf.distribute.Strategy`` of the passes over data (default: the one in scope at construction, else
        none).

    Attributes
    ----------
    surrogate : keras.Model
        ``Input(D) -> Dense(C, use_bias=False)`` in float64 holding W (it outputs logits).
    linear_layer : keras.layers.Dense
        The surrogate's Dense layer holding W (the reference's attribute).
    n_train : int
        n, the number of training samples.
    surrogate_mae : float
        Mean absolute difference between the surrogate's and the original logits on the training set.
    gradient_norm : float
        ``||∇J(W)||`` after training.
    """

    def __init__(self, model: keras.Model, train_set: tf.data.Dataset, loss_function: Optional[Callable] = None,
                 lambda_regularization: float = 1e-3, scaling_factor: float = 0.1, epochs: int = 100,
                 layer_index: Union[int, str] = -1, surrogate_target: str = "labels", newton_iterations: int = 20,
                 gradient_tolerance: float = 1e-9, strategy: Optional[tf.distribute.Strategy] = None):
        if surrogate_target not in ("labels", "logits"):
            raise ValueError(f"surrogate_target must be 'labels' or 'logits', got {surrogate_target!r}.")
        if surrogate_target == "labels" and loss_function is None:
            raise ValueError("surrogate_target='labels' needs the training loss_function (per sample, e.g. "
                             "CategoricalCrossentropy(from_logits=True, reduction=None)); or use "
                             "surrogate_target='logits'.")
        if surrogate_target == "logits" and isinstance(loss_function, _PROBABILISTIC_LOSSES):
            raise ValueError(f"With surrogate_target='logits' the loss compares the surrogate's logits with the "
                             f"original logits; {type(loss_function).__name__} expects labels or probabilities. Use "
                             "None (squared distance) or a regression loss such as MeanSquaredError(reduction=None).")
        lambda_regularization = float(lambda_regularization)
        if not np.isfinite(lambda_regularization) or lambda_regularization <= 0:
            raise ValueError(f"lambda_regularization must be a finite number > 0, got {lambda_regularization}.")
        assert_batched_dataset(train_set, "train_set")
        super().__init__(model, train_set, loss_function, layer_index, strategy)
        self.surrogate_target = surrogate_target
        self.surrogate_loss = squared_logit_distance if loss_function is None else loss_function
        self.lambda_regularization = lambda_regularization
        self.scaling_factor = scaling_factor
        self.epochs = int(epochs)
        features, logits, labels = self._training_features()
        self.n_train = int(features.shape[0])
        self._train_features, self._train_logits, self._train_labels = features, logits, labels
        self._train_targets = labels if surrogate_target == "labels" else logits
        self.kernel = tf.Variable(self._initial_kernel(features.shape[1]), dtype=tf.float64, trainable=True,
                                  name="rps_l2_kernel")
        self._train_last_layer(self.epochs, int(newton_iterations), float(gradient_tolerance))
        self.surrogate = self._create_surrogate_model()
        self.surrogate_mae = float(tf.reduce_mean(tf.abs(tf.matmul(features, self.kernel) - logits)))
        self.gradient_norm = float(tf.norm(self._objective_gradient(tf.reshape(self.kernel, [-1]))))

    # Surrogate training -------------------------------------------------------------------------
    def _training_features(self) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Features (n, D) and original logits (n, C) in float64, and the labels, of the whole training set."""
        def of_batch(batch: Tuple) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            z = self._features(batch[0])
            return tf.cast(z, tf.float64), tf.cast(self._original_logits(z), tf.float64), batch[1]

        return Executor(strategy=self.strategy).concat(of_batch, self.train_set, name="train_set")

    def _initial_kernel(self, nb_features: int) -> tf.Tensor:
        kernel = self._last_layer.kernel
        if self.head_is_last_layer and tuple(kernel.shape) == (nb_features, self.n_classes):
            return tf.cast(tf.convert_to_tensor(kernel), tf.float64)
        return tf.zeros((nb_features, self.n_classes), tf.float64)

    def _per_sample_losses(self, targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        """``L_i(Φ_i)`` for a batch: labels and ``σ(Φ)`` for ``"labels"``, original and surrogate logits else."""
        if self.surrogate_target == "labels":
            activation = self._last_layer.activation or keras.activations.linear
            if targets.dtype.is_floating:
                targets = tf.cast(targets, logits.dtype)
            losses = self.surrogate_loss(targets, activation(logits))
        else:
            losses = self.surrogate_loss(targets, logits)
        losses = tf.convert_to_tensor(losses)
        if losses.shape.rank == 0:
            raise ValueError("loss_function returned one value for the whole batch: it must return one loss per "
                             "sample (use reduction=None / 'none' for Keras losses).")
        return tf.reduce_sum(tf.reshape(tf.cast(losses, tf.float64), (tf.shape(logits)[0], -1)), axis=1)

    def _objective(self, flat_kernel: tf.Tensor) -> tf.Tensor:
        """``J(W) = (1/n) Σ_i L(T_i, z_i W) + λ ||W||²``."""
        kernel = tf.reshape(flat_kernel, (-1, self.n_classes))
        losses = self._per_sample_losses(self._train_targets, tf.matmul(self._train_features, kernel))
        return tf.reduce_sum(losses) / self.n_train + self.lambda_regularization * tf.reduce_sum(tf.square(kernel))

    @tf.function(reduce_retracing=True)
    def _objective_gradient(self, flat_kernel: tf.Tensor) -> tf.Tensor:
        return gradient_of(self._objective, flat_kernel)

    @tf.function(reduce_retracing=True)
    def _objective_hvp(self, flat_kernel: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        """Hessian of J times (P, K) vectors, by double backward: (P, K)."""
        return hessian_vector_products(self._objective, flat_kernel, vectors)

    def _train_last_layer(self, epochs: int, newton_iterations: int, gradient_tolerance: float) -> None:
        """Line-search gradient descent for ``epochs`` steps, then Newton-CG until ``∇J ≈ 0``."""
        if epochs > 0:
            search = BacktrackingLineSearch(batches_per_epoch=1, scaling_factor=self.scaling_factor)
            search.minimize(lambda: self._objective(tf.reshape(self.kernel, [-1])), [self.kernel], epochs)
        flat = tf.reshape(tf.convert_to_tensor(self.kernel), [-1])
        nb_params = int(flat.shape[0])
        for _ in range(newton_iterations):
            gradient = self._objective_gradient(flat)
            scale = 2.0 * self.lambda_regularization * max(float(tf.norm(flat)), 1e-12)
            if float(tf.norm(gradient)) <= gradient_tolerance * scale:
                break
            step = conjugate_gradients_solve(lambda v, point=flat: self._objective_hvp(point, v), gradient[:, None],
                                             maxiter=min(2 * nb_params, 2000), tol=1e-12, atol=0.0)[:, 0]
            current, shrink = float(self._objective(flat)), 1.0
            for _ in range(30):  # damped Newton: halve the step until J does not increase
                candidate = flat - shrink * step
                if float(self._objective(candidate)) <= current:
                    break
                shrink *= 0.5
            else:
                break
            flat = candidate
        self.kernel.assign(tf.reshape(flat, (-1, self.n_classes)))

    def _index_configuration(self) -> dict:
        """The surrogate's settings (its training data is not fingerprinted)."""
        return {"lambda_regularization": float(self.lambda_regularization),
                "scaling_factor": float(self.scaling_factor), "epochs": self.epochs,
                "surrogate_target": self.surrogate_target, "target_layer": self.target_layer}

    def _create_surrogate_model(self) -> keras.Model:
        nb_features = int(self.kernel.shape[0])
        surrogate = keras.Sequential([keras.Input((nb_features,), dtype="float64"),
                                      keras.layers.Dense(self.n_classes, use_bias=False, dtype="float64",
                                                         name="rps_l2_surrogate")])
        surrogate.layers[-1].kernel.assign(self.kernel)
        return surrogate

    @property
    def linear_layer(self) -> keras.layers.Dense:
        """The surrogate's last layer, ``Dense(C, use_bias=False)`` in float64 holding W (the reference's name)."""
        return self.surrogate.layers[-1]

    # Representer values -------------------------------------------------------------------------
    def _alpha_from_targets(self, features: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """``-1/(2 λ n) ∂L_i/∂Φ`` at ``Φ = z W`` for features (B, D) and targets (labels or original logits)."""
        logits = tf.matmul(tf.cast(features, tf.float64), tf.convert_to_tensor(self.kernel))
        with tf.GradientTape() as tape:
            tape.watch(logits)
            total = tf.reduce_sum(self._per_sample_losses(targets, logits))
        return tape.gradient(total, logits) / (-2.0 * self.lambda_regularization * self.n_train)

    def _compute_alpha(self, z_batch: tf.Tensor, y_batch: tf.Tensor) -> tf.Tensor:
        """``alpha_ic = -1/(2 λ n) ∂L_i/∂Φ_c`` at ``Φ = z_i W``: (B, C) float64."""
        targets = y_batch if self.surrogate_target == "labels" else self._original_logits(z_batch)
        return self._alpha_from_targets(z_batch, targets)

    @property
    def training_alpha(self) -> tf.Tensor:
        """``alpha`` of every training sample, in the order of ``train_set``: (n, C) float64."""
        return self._alpha_from_targets(self._train_features, self._train_targets)

    def predict_with_kernel(self, samples_to_evaluate: Tuple) -> tf.Tensor:
        """The surrogate's logits rebuilt from the training samples, ``Σ_i alpha[i, c] <z_i, z_t>``: (B_t, C).

        Equals ``surrogate(z_t)`` at the surrogate's stationary point (the representer theorem).
        """
        test_features = tf.cast(self._features(samples_to_evaluate[0]), tf.float64)
        return tf.matmul(tf.matmul(test_features, self._train_features, transpose_b=True), self.training_alpha)
