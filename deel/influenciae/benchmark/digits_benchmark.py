"""Mislabeled-sample detection on scikit-learn's bundled ``load_digits`` (offline, seconds per run).

1,797 grey 8×8 images of the digits 0-9, scaled to [0, 1] (data and model builders: :mod:`.digits`). The model is a
small MLP (or CNN) whose last layer is a bias-free ``Dense(10)`` producing logits, so every method (RPS included)
applies. The defaults (MLP 64-64-10, Adam 3e-3, 100 epochs, batch 64) fit the clean samples and start memorising some
mislabeled ones, the regime where the loss alone stops finding them (the accuracy on the noisy labels of a run is in
``benchmarks/README.md``). scikit-learn is imported only when the data are loaded.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from .base_benchmark import BaseTrainingProcedure, MislabelingDetectorEvaluator, checkpoint_callbacks
from .digits import DIGITS_CLASSES, DIGITS_PIXELS, build_mlp, load_digits_split, train_classifier


def load_digits_datasets(test_ratio: float = 0.2, seed: int = 0, train_size: Optional[int] = None,
                         test_size: Optional[int] = None, image: bool = False
                         ) -> Tuple[tf.data.Dataset, tf.data.Dataset]:
    """scikit-learn's digits as unbatched ``(x, one_hot_y)`` training and test datasets
    (:func:`~deel.influenciae.benchmark.digits.load_digits_split` with the test set first).

    Parameters
    ----------
    test_ratio
        Share of the 1,797 samples held out for the test set (seeded split).
    seed
        Seed of the split.
    train_size, test_size
        Keep only the first samples of each split (None or <= 0: all).
    image
        ``x`` of shape (8, 8, 1) instead of (64,).

    Returns
    -------
    training_dataset, test_dataset
        ``x`` float32 in [0, 1], ``y`` one-hot float32 (10,).
    """
    split = load_digits_split(seed, test_ratio=test_ratio, test_first=True,
                              input_shape=(8, 8, 1) if image else (DIGITS_PIXELS,)).take(train_size, test_size)
    arrays = split.arrays(as_one_hot=True)
    train = tf.data.Dataset.from_tensor_slices((arrays["x_train"], arrays["y_train"]))
    test = tf.data.Dataset.from_tensor_slices((arrays["x_test"], arrays["y_test"]))
    return train, test


def _as_arrays(dataset: tf.data.Dataset) -> Tuple[np.ndarray, np.ndarray]:
    """All ``(x, y)`` of an unbatched dataset as two arrays."""
    parts = list(dataset.batch(4096).as_numpy_iterator())
    if not parts:
        raise ValueError("The dataset is empty.")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def build_digits_model(input_shape: Sequence[int], nb_classes: int = DIGITS_CLASSES, model_type: str = "mlp",
                       hidden_units: int = 64, use_regularization: bool = False, l2: float = 1e-4,
                       use_bias: bool = False) -> keras.Model:
    """Small classifier returning logits (:func:`~deel.influenciae.benchmark.digits.build_mlp`).

    Parameters
    ----------
    input_shape
        Shape of one input: (64,) for the MLP, (8, 8, 1) for the CNN (other shapes are flattened by the MLP).
    nb_classes
        Number of classes.
    model_type
        ``'mlp'``: Dense(hidden, ReLU) → Dense(C); ``'cnn'``: Conv2D(8, 3×3, ReLU) → Flatten → Dense(hidden, ReLU)
        → Dense(C).
    hidden_units
        Width of the hidden Dense layer.
    use_regularization, l2
        L2 penalty ``l2`` on every kernel.
    use_bias
        Bias of the last layer (False by default so that RPS applies).
    """
    penalty = l2 if use_regularization else None
    stem: List[keras.layers.Layer] = []
    if model_type == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model_type='cnn' needs image inputs (H, W, C), got input_shape {tuple(input_shape)}; "
                             "use load_digits_datasets(image=True).")
        regularizer = keras.regularizers.L2(l2) if use_regularization else None
        stem = [keras.layers.Conv2D(8, 3, activation="relu", kernel_regularizer=regularizer), keras.layers.Flatten()]
    elif model_type != "mlp":
        raise ValueError(f"model_type must be 'mlp' or 'cnn', got {model_type!r}.")
    return build_mlp(input_shape, hidden_units, nb_classes, output_bias=use_bias, l2=penalty, stem=stem)


def default_epochs_to_save(epochs: int, nb_checkpoints: int = 5) -> List[int]:
    """``nb_checkpoints`` evenly spaced 0-based epochs, the last one being the final epoch."""
    step = max(epochs // nb_checkpoints, 1)
    return sorted({int(epoch) for epoch in range(epochs - 1, -1, -step)[:nb_checkpoints]})


class DigitsTrainingProcedure(BaseTrainingProcedure):
    """Train a small digits classifier with Adam and collect TracIn checkpoints.

    Parameters
    ----------
    epochs
        Training epochs.
    model_type
        ``'mlp'`` or ``'cnn'`` (see :func:`build_digits_model`).
    hidden_units
        Width of the hidden layer.
    learning_rate
        Adam's learning rate.
    use_regu, l2
        L2 penalty on the kernels.
    use_bias
        Bias of the last layer (keep False for RPS).
    epochs_to_save
        0-based epochs at which a TracIn checkpoint is taken (default: 5 evenly spaced, ending at the last
        epoch; an empty list takes none and ``train_info`` is None).
    verbose
        Keras' progress output.
    use_tensorboard
        Write TensorBoard logs to ``log_path``.
    """

    def __init__(self, epochs: int = 100, model_type: str = "mlp", hidden_units: int = 64,
                 learning_rate: float = 3e-3, use_regu: bool = False, l2: float = 1e-4, use_bias: bool = False,
                 epochs_to_save: Optional[Sequence[int]] = None, verbose: bool = False, use_tensorboard: bool = False):
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}.")
        self.epochs = int(epochs)
        self.model_type = model_type
        self.hidden_units = int(hidden_units)
        self.learning_rate = float(learning_rate)
        self.use_regu = bool(use_regu)
        self.l2 = float(l2)
        self.use_bias = bool(use_bias)
        self.epochs_to_save = default_epochs_to_save(self.epochs) if epochs_to_save is None else \
            sorted({int(epoch) for epoch in epochs_to_save if 0 <= int(epoch) < self.epochs})
        self.verbose = bool(verbose)
        self.use_tensorboard = bool(use_tensorboard)

    def train(self, training_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset, train_batch_size: int = 128,
              test_batch_size: int = 128, log_path: Optional[str] = None
              ) -> Tuple[float, float, keras.Model, Optional[Tuple[List[keras.Model], List[float]]]]:
        x_train, y_train = _as_arrays(training_dataset)
        x_test, y_test = _as_arrays(test_dataset)
        model = build_digits_model(x_train.shape[1:], y_train.shape[1], self.model_type, self.hidden_units,
                                   self.use_regu, self.l2, self.use_bias)
        optimizer = keras.optimizers.Adam(self.learning_rate)
        callbacks, saver = checkpoint_callbacks(self.epochs_to_save, optimizer, self.use_tensorboard, log_path)
        train_classifier(model, x_train, y_train, self.epochs, train_batch_size, optimizer=optimizer,
                         metrics=["accuracy"], shuffle=True, callbacks=callbacks, verbose=2 if self.verbose else 0)
        train_acc = float(model.evaluate(x_train, y_train, batch_size=test_batch_size, verbose=0,
                                         return_dict=True)["accuracy"])
        test_acc = float(model.evaluate(x_test, y_test, batch_size=test_batch_size, verbose=0,
                                        return_dict=True)["accuracy"])
        train_info = saver.checkpoints() if saver is not None else None
        return train_acc, test_acc, model, train_info


class DigitsMislabelingDetectorEvaluator(MislabelingDetectorEvaluator):
    """:class:`MislabelingDetectorEvaluator` on scikit-learn's digits with :class:`DigitsTrainingProcedure`.

    Parameters
    ----------
    epochs, model_type, hidden_units, learning_rate, use_regu, use_bias, epochs_to_save
        See :class:`DigitsTrainingProcedure`.
    mislabeling_ratio
        Probability that a training label is replaced by another class.
    train_batch_size, test_batch_size, influence_batch_size
        See :class:`MislabelingDetectorEvaluator`.
    take_batch
        Keep only the first ``take_batch`` samples of the training and of the test split (None or <= 0: all).
    verbose_training, use_tensorboard
        Keras' progress output and TensorBoard logs of the training.
    split_seed
        Seed of the train/test split (kept fixed across evaluations).
    """

    def __init__(self, epochs: int = 100, model_type: str = "mlp", mislabeling_ratio: float = 0.1,
                 use_regu: bool = False, use_bias: bool = False, train_batch_size: int = 64,
                 test_batch_size: int = 128, influence_batch_size: Optional[int] = None,
                 epochs_to_save: Optional[Sequence[int]] = None, take_batch: Optional[int] = None,
                 verbose_training: bool = False, use_tensorboard: bool = False, hidden_units: int = 64,
                 learning_rate: float = 3e-3, split_seed: int = 0):
        train, test = load_digits_datasets(seed=split_seed, train_size=take_batch, test_size=take_batch,
                                           image=model_type == "cnn")
        procedure = DigitsTrainingProcedure(epochs, model_type, hidden_units, learning_rate, use_regu,
                                            use_bias=use_bias, epochs_to_save=epochs_to_save,
                                            verbose=verbose_training, use_tensorboard=use_tensorboard)
        config: Dict[str, Any] = {"dataset": "digits", "epochs": epochs, "model_type": model_type,
                                  "hidden_units": hidden_units, "learning_rate": learning_rate,
                                  "use_regularization": use_regu, "use_bias": use_bias, "optimizer": "adam",
                                  "epochs_to_save": procedure.epochs_to_save, "samples_to_take": take_batch,
                                  "split_seed": split_seed}
        super().__init__(train, test, procedure, DIGITS_CLASSES, mislabeling_ratio, train_batch_size,
                         test_batch_size, influence_batch_size, config)
