"""Common base of the representer-point methods (Yeh et al. 2018; Sui et al. 2021)."""
from abc import abstractmethod
from typing import Callable, Optional, Tuple, Union

import keras
import tensorflow as tf

from ..common.base_influence import BaseInfluenceCalculator
from ..common.distribution import resolve_strategy
from ..common.model_wrappers import check_unreduced_loss
from ..utils.model_split import LayerInputCapture, NotSplittableError, split_model
from ..utils.tf_operations import assert_batched_dataset, find_layer


def check_last_layer(model: keras.Model) -> keras.layers.Dense:
    """Return the model's last layer, raising ``ValueError`` unless it is a ``Dense`` layer without bias."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras 3 model (keras.Model), got {type(model).__name__}.")
    if not model.layers:
        raise ValueError("The model has no layers.")
    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or last.use_bias:
        kind = type(last).__name__ + (" with a bias" if isinstance(last, keras.layers.Dense) else "")
        raise ValueError(f"The last layer of the model must be a Dense layer with no bias (use_bias=False); got "
                         f"{kind} ({last.name!r}).")
    return last


class BaseRepresenterPoint(BaseInfluenceCalculator):
    r"""Representer points: decompose a prediction into contributions of the training samples.

    The model is split into a feature extractor ``z = f(x)`` (D features) and a head whose last layer is a
    bias-free Dense layer with C units producing the pre-activation logits ``Φ(z)``. A method computes one
    coefficient per training sample and class, ``alpha`` (n, C), meant to decompose the logits as

        ``Φ_c(z_t) ≈ Σ_i alpha[i, c] · <z_i, z_t>``

    (exact for RPS-L2 at the surrogate's optimum — the representer theorem; only a per-sample least-squares
    attribution for RPS-LJE, whose sum does not rebuild the logits).

    * influence vector of a training sample: the pair ``(alpha_i (C,), z_i (D,))`` (a tuple of (B, C), (B, D));
    * test-side representation: ``(z_t (D,), pred(t))`` with ``pred(t)`` the class the original model predicts;
    * influence of training sample i on test sample t: ``alpha[i, pred(t)] · <z_i, z_t>`` (for a one-unit binary
      head: ``alpha[i, 0] · <z_i, z_t>``), shape (B_t, B_tr) for any batch sizes. **Positive**: i pushes the
      logit of the predicted class up (an excitatory / supporting sample); negative: inhibitory;
    * self-influence: ``|alpha[i, pred(i)]|`` (``|alpha[i, 0]|`` for a one-unit head), shape (B, 1).

    Parameters
    ----------
    model
        A built Sequential or Functional classifier whose last layer is ``Dense(C, use_bias=False)`` (any
        activation); it is copied, never modified.
    train_set
        Batched training dataset of ``(x, y)``.
    loss_function
        Per-sample (un-reduced) loss, or None where the method does not need one.
    target_layer
        Where the features are taken: the input of this layer (name or index; default -1, the last Dense).
    strategy
        The ``tf.distribute.Strategy`` of the passes over data (default: the one in scope at construction, else
        none).

    Raises
    ------
    ValueError
        If the last layer is not a bias-free Dense layer, the dataset is not batched, or the loss reduces.
    """

    def __init__(self, model: keras.Model, train_set: tf.data.Dataset, loss_function: Optional[Callable],
                 target_layer: Union[int, str] = -1, strategy: Optional[tf.distribute.Strategy] = None):
        check_last_layer(model)
        self._strategy = resolve_strategy(strategy)
        assert_batched_dataset(train_set, "train_set")
        if loss_function is not None:
            check_unreduced_loss(loss_function)
        self.model = model
        self.train_set = train_set
        self.loss_function = loss_function
        self.target_layer = target_layer
        self.feature_extractor, self.original_head = self._split(model, target_layer)
        self._last_layer = self.original_head.layers[-1]
        self.n_classes = int(self._last_layer.units)
        self.dtype = tf.as_dtype(self._last_layer.kernel.dtype)
        # Pre-activation logits Φ(z): a copy of the head whose last layer has no activation.
        self.logits_head = keras.models.clone_model(self.original_head)
        self.logits_head.set_weights(self.original_head.get_weights())
        self.logits_head.layers[-1].activation = keras.activations.linear
        computing = [layer for layer in self.original_head.layers if not isinstance(layer, keras.layers.InputLayer)]
        self.head_is_last_layer = len(computing) == 1

    @staticmethod
    def _split(model: keras.Model, target_layer: Union[int, str]) -> Tuple[Callable, keras.Model]:
        """``(feature extractor, head)``: a copy of the model cut at ``target_layer``; for a model without a graph
        (subclassed), the input of the last layer captured while the model runs, and a copy of that layer."""
        try:
            return split_model(model, target_layer)
        except NotSplittableError as error:
            last = model.layers[-1]
            if find_layer(model, target_layer) is not last:
                raise ValueError(f"The model cannot be cut at target_layer={target_layer!r} ({error}); for such a "
                                 "model (e.g. subclassed) the features can only be the input of the last layer: "
                                 "use target_layer=-1.") from error
            features = int(last.kernel.shape[0])
            head_layer = keras.layers.Dense.from_config(last.get_config())
            head = keras.Sequential([keras.Input((features,), dtype=last.kernel.dtype), head_layer])
            head_layer.set_weights(last.get_weights())
            return LayerInputCapture(model, last), head

    # Building blocks ----------------------------------------------------------------------------
    def _features(self, inputs) -> tf.Tensor:
        """Features ``z = f(x)``: (B, D)."""
        return tf.cast(self.feature_extractor(inputs, training=False), self.dtype)

    def _original_logits(self, features: tf.Tensor) -> tf.Tensor:
        """Pre-activation outputs of the original last layer, ``Φ(z)``: (B, C)."""
        return tf.cast(self.logits_head(features, training=False), self.dtype)

    def _predicted_class(self, features: tf.Tensor) -> tf.Tensor:
        """Class predicted by the original model (argmax of the logits): (B,) int32; zeros for a one-unit head."""
        if self.n_classes == 1:
            return tf.zeros(tf.shape(features)[:1], tf.int32)
        return tf.argmax(self._original_logits(features), axis=1, output_type=tf.int32)

    @abstractmethod
    def _compute_alpha(self, z_batch: tf.Tensor, y_batch: tf.Tensor) -> tf.Tensor:
        """Representer coefficients of a batch of training samples: (B, C)."""

    def compute_alpha(self, train_samples: Tuple) -> tf.Tensor:
        """Representer coefficients ``alpha`` of a batch ``(x, y)`` of training samples: (B, C)."""
        return self._compute_alpha(self._features(train_samples[0]), train_samples[1])

    # Hooks --------------------------------------------------------------------------------------
    def _compute_influence_vector(self, train_samples: Tuple) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(alpha (B, C), z (B, D))`` for a batch of training samples."""
        features = self._features(train_samples[0])
        return tf.cast(self._compute_alpha(features, train_samples[1]), self.dtype), features

    def _preprocess_samples(self, samples: Tuple) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(z_t (B_t, D), pred(t) (B_t,))``: features and predicted class of the samples to evaluate."""
        features = self._features(samples[0])
        return features, self._predicted_class(features)

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: Tuple,
                                                        influence_vector: Tuple) -> tf.Tensor:
        """``alpha[i, pred(t)] · <z_i, z_t>`` for every pair: (B_t, B_tr)."""
        test_features, test_classes = preproc_test_sample
        alpha, train_features = influence_vector
        alpha = tf.cast(alpha, test_features.dtype)
        kernel = tf.matmul(test_features, tf.cast(train_features, test_features.dtype), transpose_b=True)
        if self.n_classes == 1:
            return kernel * tf.reshape(alpha, (1, -1))
        # alpha columns of the class predicted for each test sample: (B_tr, B_t) -> (B_t, B_tr).
        return kernel * tf.transpose(tf.gather(alpha, test_classes, axis=1))

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``|alpha[i, pred(i)]|``: (B, 1)."""
        alpha, features = self._compute_influence_vector(train_samples)
        if self.n_classes == 1:
            return tf.abs(tf.reshape(alpha, (-1, 1)))
        picked = tf.gather(alpha, self._predicted_class(features), axis=1, batch_dims=1)
        return tf.abs(picked)[:, None]
