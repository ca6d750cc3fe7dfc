"""Mislabeled-sample detection on CIFAR-10 (the reference's benchmark), for users who have the data.

Nothing is downloaded unless asked: :func:`load_cifar10` reads the "CIFAR-10 python version" folder
(``cifar-10-batches-py``) from ``data_path``, the ``INFLUENCIAE_CIFAR10_PATH`` environment variable or Keras' cache
(``~/.keras/datasets``), and only calls ``keras.datasets.cifar10.load_data()`` (network) with
``allow_download=True``.
"""
import math
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from .base_benchmark import BaseTrainingProcedure, MislabelingDetectorEvaluator, checkpoint_callbacks

CIFAR10_CLASSES = 10
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ENV = "INFLUENCIAE_CIFAR10_PATH"
_TRAIN_FILES = tuple(f"data_batch_{index}" for index in range(1, 6))
_TEST_FILE = "test_batch"


def _candidate_folders(data_path: Optional[str]) -> List[str]:
    roots = [data_path] if data_path is not None else \
        [os.environ.get(CIFAR10_ENV), os.path.join(os.path.expanduser("~"), ".keras", "datasets")]
    folders = []
    for root in roots:
        if root:
            folders += [root, os.path.join(root, CIFAR10_FOLDER)]
    return folders


def _read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (n, 32, 32, 3) uint8 and labels (n,) of one pickled CIFAR-10 batch file."""
    with open(path, "rb") as handle:
        content = pickle.load(handle, encoding="bytes")
    images = np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(content[b"labels"], dtype=np.int64)


def load_cifar10(data_path: Optional[str] = None, allow_download: bool = False
                 ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 as ``((x_train, y_train), (x_test, y_test))``: uint8 images (n, 32, 32, 3), int labels (n,).

    Parameters
    ----------
    data_path
        Folder holding ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the extracted
        ``cifar-10-python.tar.gz``), or its parent. Default: ``$INFLUENCIAE_CIFAR10_PATH``, then Keras' cache
        ``~/.keras/datasets``.
    allow_download
        If the files are not found, download them with ``keras.datasets.cifar10.load_data()`` (network).

    Raises
    ------
    FileNotFoundError
        If the files are not found and ``allow_download`` is False.
    RuntimeError
        If the download fails (e.g. no network).
    """
    for folder in _candidate_folders(data_path):
        files = [os.path.join(folder, name) for name in _TRAIN_FILES + (_TEST_FILE,)]
        if all(os.path.isfile(file) for file in files):
            train = [_read_batch(file) for file in files[:-1]]
            x_test, y_test = _read_batch(files[-1])
            return (np.concatenate([part[0] for part in train]), np.concatenate([part[1] for part in train])), \
                (x_test, y_test)
    if not allow_download:
        raise FileNotFoundError(
            f"CIFAR-10 not found (looked in {_candidate_folders(data_path)}). Download {CIFAR10_URL}, extract it and "
            f"pass the folder {CIFAR10_FOLDER!r} (or its parent) as data_path / --data-path, or set "
            f"{CIFAR10_ENV}; or allow the download with allow_download=True / --allow-download true (network).")
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # pylint: disable=broad-exception-caught
        raise RuntimeError(f"Could not download CIFAR-10 ({error}). Without network, download {CIFAR10_URL} "
                           "elsewhere, extract it and pass the folder as data_path / --data-path.") from error
    return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))


def cifar10_datasets(data_path: Optional[str] = None, allow_download: bool = False, take_batch: Optional[int] = None
                     ) -> Tuple[tf.data.Dataset, tf.data.Dataset]:
    """Unbatched ``(x, one_hot_y)`` CIFAR-10 datasets, images scaled to [-1, 1] (``2x/255 - 1``), float32.

    ``take_batch`` keeps only the first samples of each split (None or <= 0: all). See :func:`load_cifar10`.
    """
    (x_train, y_train), (x_test, y_test) = load_cifar10(data_path, allow_download)
    if take_batch is not None and take_batch > 0:
        x_train, y_train, x_test, y_test = (x_train[:take_batch], y_train[:take_batch], x_test[:take_batch],
                                            y_test[:take_batch])

    def prepare(images, labels):
        scaled = (2.0 * images.astype(np.float32) / 255.0 - 1.0).astype(np.float32)
        return tf.data.Dataset.from_tensor_slices((scaled, np.eye(CIFAR10_CLASSES, dtype=np.float32)[labels]))

    return prepare(x_train, y_train), prepare(x_test, y_test)


def _resnet_unit(inputs: Any, filters: int, strides: int, regularizer: Any) -> Any:
    """conv 3×3 → BN → ReLU ("v1" unit)."""
    outputs = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                                  kernel_initializer="he_normal", kernel_regularizer=regularizer)(inputs)
    outputs = keras.layers.BatchNormalization()(outputs)
    return keras.layers.Activation("relu")(outputs)


def build_resnet_backbone(input_shape: Sequence[int] = (32, 32, 3), repetitions: Sequence[int] = (3, 3, 3),
                          initial_filters: int = 16, l2: float = 1e-4) -> keras.Model:
    """Small ResNet for 32×32 images: a 3×3 stem, stages of basic blocks (16/32/64 filters, stride 2 at the first
    block of stages 2 and 3, projection shortcut when the shape changes), final BN-ReLU; 8×8×64 output."""
    regularizer = keras.regularizers.L2(l2)
    inputs = keras.Input(tuple(input_shape))
    outputs = _resnet_unit(inputs, initial_filters, 1, regularizer)
    filters = initial_filters
    for stage, blocks in enumerate(repetitions):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = outputs
            residual = _resnet_unit(outputs, filters, strides, regularizer)
            residual = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                                           kernel_regularizer=regularizer)(residual)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                               kernel_initializer="he_normal", kernel_regularizer=regularizer)(shortcut)
            outputs = keras.layers.Add()([shortcut, residual])
        filters *= 2
    outputs = keras.layers.BatchNormalization()(outputs)
    outputs = keras.layers.Activation("relu")(outputs)
    return keras.Model(inputs, outputs, name="resnet_backbone")


def build_backbone(model: Union[str, keras.Model]) -> keras.Model:
    """``'resnet'`` (:func:`build_resnet_backbone`), ``'efficient_net'`` (EfficientNetB0) or ``'vgg19'`` without
    pretrained weights nor top, or a given Keras model."""
    if isinstance(model, keras.Model):
        return model
    if model == "resnet":
        return build_resnet_backbone()
    if model == "efficient_net":
        return keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    if model == "vgg19":
        return keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 32, 3))
    raise ValueError(f"model must be 'resnet', 'efficient_net', 'vgg19' or a keras.Model, got {model!r}.")


class ConvNetCIFAR(keras.Sequential):  # pylint: disable=abstract-method,too-many-ancestors
    """CIFAR-10 classifier: backbone → Flatten → Dense(128) → Dropout(0.4) → LeakyReLU → Dense(10) (logits).

    Parameters
    ----------
    model
        Backbone: ``'resnet'``, ``'efficient_net'``, ``'vgg19'`` or a Keras model taking (32, 32, 3) images.
    use_regularization
        L1L2(1e-4, 1e-4) on both Dense layers (and he_normal initialisation of the last one).
    use_bias
        Bias of the last layer (False for RPS).
    """

    def __init__(self, model: Union[str, keras.Model] = "resnet", use_regularization: bool = True,
                 use_bias: bool = True, **kwargs: Any):
        regularizer = (lambda: keras.regularizers.L1L2(1e-4, 1e-4)) if use_regularization else (lambda: None)
        layers = [keras.Input((32, 32, 3)), build_backbone(model), keras.layers.Flatten(),
                  keras.layers.Dense(128, kernel_regularizer=regularizer()), keras.layers.Dropout(0.4),
                  keras.layers.LeakyReLU(),
                  keras.layers.Dense(CIFAR10_CLASSES, use_bias=use_bias, kernel_regularizer=regularizer(),
                                     kernel_initializer="he_normal" if use_regularization else "glorot_uniform")]
        super().__init__(layers, **kwargs)


def step_decay(epoch: int, learning_rate: float, initial: float = 1e-3, every: int = 10, last: int = 50) -> float:
    """×0.5 at epochs ``every``, ``2·every``, ... up to ``last`` (from ``initial``); other epochs keep the current
    rate (so ReduceLROnPlateau's changes survive)."""
    if 0 < epoch <= last and epoch % every == 0:
        return float(initial * 0.5 ** (epoch // every))
    return float(learning_rate)


class Cifar10TrainingProcedure(BaseTrainingProcedure):
    """Train :class:`ConvNetCIFAR` as the reference (augmentation: horizontal flip and ±10 % translations).

    Parameters
    ----------
    epochs
        Training epochs.
    model_type
        Backbone (see :class:`ConvNetCIFAR`).
    use_regu, use_bias
        See :class:`ConvNetCIFAR`.
    force_overfit
        SGD(momentum 0.9) with an exponential decay from 0.1 to 1e-4 over 200 epochs instead of Adam(1e-3) with
        a step decay (×0.5 every 10 epochs up to 50) and ReduceLROnPlateau.
    epochs_to_save
        0-based epochs of the TracIn checkpoints (None: no checkpoint, ``train_info`` is None).
    verbose
        Keras' progress output.
    use_tensorboard
        TensorBoard logs under ``log_path``.
    """

    def __init__(self, epochs: int = 60, model_type: Union[str, keras.Model] = "resnet", use_regu: bool = True,
                 use_bias: bool = True, force_overfit: bool = False, epochs_to_save: Optional[Sequence[int]] = None,
                 verbose: bool = True, use_tensorboard: bool = False):
        self.epochs = int(epochs)
        self.model_type = model_type
        self.use_regu = bool(use_regu)
        self.use_bias = bool(use_bias)
        self.force_overfit = bool(force_overfit)
        self.epochs_to_save = list(epochs_to_save) if epochs_to_save else None
        self.verbose = bool(verbose)
        self.use_tensorboard = bool(use_tensorboard)

    def _optimizer_and_callbacks(self, steps_per_epoch: int) -> Tuple[keras.optimizers.Optimizer, List[Any]]:
        if self.force_overfit:
            total_steps = max(200 * steps_per_epoch, 1)
            schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=total_steps, decay_rate=1e-3)
            return keras.optimizers.SGD(schedule, momentum=0.9), []
        callbacks = [keras.callbacks.LearningRateScheduler(step_decay),
                     keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=math.sqrt(0.1), cooldown=1, patience=3,
                                                       min_lr=5e-7)]
        return keras.optimizers.Adam(1e-3), callbacks

    def train(self, training_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset, train_batch_size: int = 128,
              test_batch_size: int = 128, log_path: Optional[str] = None
              ) -> Tuple[float, float, keras.Model, Optional[Tuple[List[keras.Model], List[float]]]]:
        augment = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                    keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest")])
        nb_train = int(training_dataset.cardinality())
        steps_per_epoch = max(math.ceil(nb_train / train_batch_size), 1)
        train_ds = training_dataset.shuffle(1000).batch(train_batch_size) \
            .map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE) \
            .prefetch(tf.data.AUTOTUNE)
        model = ConvNetCIFAR(self.model_type, self.use_regu, self.use_bias)
        optimizer, callbacks = self._optimizer_and_callbacks(steps_per_epoch)
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        extra, saver = checkpoint_callbacks(self.epochs_to_save, optimizer, self.use_tensorboard, log_path)
        callbacks += extra
        # The dataset is shuffled above; Keras' own shuffle does not apply to datasets.
        model.fit(train_ds, epochs=self.epochs, callbacks=callbacks, verbose=1 if self.verbose else 0, shuffle=False)
        train_acc = float(model.evaluate(training_dataset.batch(test_batch_size), verbose=0,
                                         return_dict=True)["accuracy"])
        test_acc = float(model.evaluate(test_dataset.batch(test_batch_size), verbose=0, return_dict=True)["accuracy"])
        train_info = saver.checkpoints() if saver is not None and saver.models else None
        return train_acc, test_acc, model, train_info


class Cifar10MislabelingDetectorEvaluator(MislabelingDetectorEvaluator):
    """:class:`MislabelingDetectorEvaluator` on CIFAR-10 with :class:`Cifar10TrainingProcedure`.

    Parameters
    ----------
    epochs, model_type, use_regu, use_bias, force_overfit, epochs_to_save
        See :class:`Cifar10TrainingProcedure`.
    mislabeling_ratio
        Probability that a training label is replaced by another class (reference default 0.0005).
    train_batch_size, test_batch_size, influence_batch_size
        See :class:`MislabelingDetectorEvaluator`.
    take_batch
        Keep only the first ``take_batch`` samples of the training and test sets.
    verbose_training, use_tensorboard
        Keras' progress output and TensorBoard logs of the training.
    data_path, allow_download
        Where the data are, and whether they may be downloaded (see :func:`load_cifar10`).

    Raises
    ------
    FileNotFoundError, RuntimeError
        When the data are missing (see :func:`load_cifar10`).
    """

    def __init__(self, epochs: int = 60, model_type: str = "resnet", mislabeling_ratio: float = 0.0005,
                 use_regu: bool = True, use_bias: bool = True, force_overfit: bool = False,
                 train_batch_size: int = 128, test_batch_size: int = 128, influence_batch_size: Optional[int] = None,
                 epochs_to_save: Optional[Sequence[int]] = None, take_batch: Optional[int] = None,
                 verbose_training: bool = True, use_tensorboard: bool = False, data_path: Optional[str] = None,
                 allow_download: bool = False):
        train, test = cifar10_datasets(data_path, allow_download, take_batch)
        procedure = Cifar10TrainingProcedure(epochs, model_type, use_regu, use_bias, force_overfit, epochs_to_save,
                                             verbose_training, use_tensorboard)
        config: Dict[str, Any] = {"dataset": "cifar10", "epochs": epochs, "model_type": str(model_type),
                                  "mislabeling_ratio": mislabeling_ratio, "use_regularization": use_regu,
                                  "use_bias": use_bias, "optimizer": "sgd" if force_overfit else "adam",
                                  "train_batch_size": train_batch_size, "test_batch_size": test_batch_size,
                                  "influence_batch_size": influence_batch_size, "epochs_to_save": epochs_to_save,
                                  "samples_to_take": take_batch}
        super().__init__(train, test, procedure, CIFAR10_CLASSES, mislabeling_ratio, train_batch_size,
                         test_batch_size, influence_batch_size, config)
