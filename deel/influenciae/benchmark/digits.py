"""scikit-learn's bundled digits and the small classifiers trained on them: the one implementation shared by the
benchmark, the demo and the performance scripts of ``benchmarks/``.

Nothing is downloaded: the 1,797 grey 8×8 images of the digits 0-9 ship with scikit-learn (imported only when the
data are loaded). Pixels are scaled to [0, 1]. A split is a seeded permutation of the samples, so a seed gives the
same samples wherever it is used.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np

DIGITS_CLASSES = 10
DIGITS_SAMPLES = 1797
DIGITS_PIXELS = 64

SeedLike = Union[int, np.random.Generator]


def load_digits_arrays(input_shape: Sequence[int] = (DIGITS_PIXELS,)) -> Tuple[np.ndarray, np.ndarray]:
    """Every digit, in scikit-learn's order.

    Parameters
    ----------
    input_shape
        Shape of one input, holding 64 pixels: ``(64,)`` (default), ``(8, 8)`` or ``(8, 8, 1)``.

    Returns
    -------
    inputs, labels
        ``inputs`` (1797, *input_shape) float32 in [0, 1]; ``labels`` (1797,) int64 classes 0-9.

    Raises
    ------
    ValueError
        If ``input_shape`` does not hold 64 values.
    ImportError
        If scikit-learn (which ships the data) is not installed.
    """
    shape = tuple(int(size) for size in input_shape)
    if int(np.prod(shape)) != DIGITS_PIXELS:
        raise ValueError(f"input_shape must hold {DIGITS_PIXELS} pixels, got {shape}.")
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError("The digits ship with scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    inputs = (digits.data / 16.0).astype(np.float32).reshape((-1,) + shape)
    return inputs, digits.target.astype(np.int64)


def one_hot(labels: np.ndarray, nb_classes: int = DIGITS_CLASSES) -> np.ndarray:
    """Integer labels (N,) as float32 one-hot rows (N, nb_classes)."""
    return np.eye(nb_classes, dtype=np.float32)[np.asarray(labels)]


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Disjoint training and test samples of the digits.

    Attributes
    ----------
    x_train, x_test
        Inputs (N, *input_shape), float32 in [0, 1].
    y_train, y_test
        Integer labels (N,), int64.
    train_index, test_index
        Positions of the samples in scikit-learn's order.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray

    def take(self, n_train: Optional[int] = None, n_test: Optional[int] = None) -> "DigitsSplit":
        """The first ``n_train`` training and ``n_test`` test samples (None or <= 0: all of them)."""
        train = slice(None) if n_train is None or n_train <= 0 else slice(int(n_train))
        test = slice(None) if n_test is None or n_test <= 0 else slice(int(n_test))
        return DigitsSplit(self.x_train[train], self.y_train[train], self.x_test[test], self.y_test[test],
                           self.train_index[train], self.test_index[test])

    def arrays(self, as_one_hot: bool = False) -> Dict[str, np.ndarray]:
        """``x_train``, ``y_train``, ``x_test``, ``y_test``; the labels one-hot float32 when ``as_one_hot``."""
        labels = one_hot if as_one_hot else np.asarray
        return {"x_train": self.x_train, "y_train": labels(self.y_train), "x_test": self.x_test,
                "y_test": labels(self.y_test)}


def load_digits_split(seed: SeedLike = 0, n_train: Optional[int] = None, n_test: Optional[int] = None,
                      test_ratio: float = 0.2, test_first: bool = True,
                      input_shape: Sequence[int] = (DIGITS_PIXELS,)) -> DigitsSplit:
    """A seeded split of the digits: one permutation of the 1,797 samples cut into two consecutive parts.

    With ``test_first`` (the benchmark's and the demo's split) the test set is the first ``n_test`` samples of the
    permutation (default ``round(test_ratio · 1797)``) and the training set the next ``n_train`` (default: all the
    others); otherwise the training set comes first (default ``1797 - round(test_ratio · 1797)`` samples) and the
    test set follows.

    Parameters
    ----------
    seed
        Seed of the permutation, or a NumPy generator (which the permutation advances: the caller may keep drawing
        from it).
    n_train, n_test
        Sizes of the two parts (None: see above).
    test_ratio
        Share of the samples held out when the size of the first part is not given, in (0, 1).
    test_first
        Which part comes first in the permutation.
    input_shape
        Shape of one input (see :func:`load_digits_arrays`).

    Raises
    ------
    ValueError
        If ``test_ratio`` is outside (0, 1) or the two parts need more than 1,797 samples.
    """
    if not 0 < test_ratio < 1:
        raise ValueError(f"test_ratio must be in (0, 1), got {test_ratio}.")
    inputs, labels = load_digits_arrays(input_shape)
    total = len(labels)
    held_out = int(round(test_ratio * total))
    if test_first:
        first, second = (held_out if n_test is None else int(n_test)), n_train
    else:
        first, second = (total - held_out if n_train is None else int(n_train)), n_test
    second = total - first if second is None else int(second)
    if first < 0 or second < 0 or first + second > total:
        raise ValueError(f"digits has {total} samples, {first} + {second} requested.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    order = rng.permutation(total)
    head, tail = order[:first], order[first:first + second]
    train_index, test_index = (tail, head) if test_first else (head, tail)
    return DigitsSplit(inputs[train_index], labels[train_index], inputs[test_index], labels[test_index],
                       train_index, test_index)


def build_mlp(input_shape: Sequence[int] = (DIGITS_PIXELS,), hidden_units: Union[int, Sequence[int]] = (32,),
              nb_classes: int = DIGITS_CLASSES, activation: str = "relu", output_bias: bool = True,
              l2: Optional[float] = None, layer_names: Optional[Sequence[str]] = None,
              stem: Sequence[keras.layers.Layer] = (), weights: Optional[List[np.ndarray]] = None,
              seed: Optional[int] = None) -> keras.Sequential:
    """The multilayer perceptron every digits experiment uses, returning logits.

    ``Input(input_shape) → stem → Dense(h_1, activation) → … → Dense(h_k, activation) → Dense(nb_classes)``; a
    ``Flatten`` follows the input when there is no stem and the input is not flat (a stem must end flat).

    Parameters
    ----------
    input_shape
        Shape of one input.
    hidden_units
        Width of each hidden Dense layer (an int for one layer; empty for a linear model).
    nb_classes
        Width of the output layer.
    activation
        Activation of the hidden layers.
    output_bias
        Bias of the output layer (False for the representer-point methods, which need a bias-free last Dense).
    l2
        L2 penalty on every Dense kernel (None: none).
    layer_names
        Names of the Dense layers, hidden ones then the output (None: Keras' names).
    stem
        Layers placed between the input and the hidden layers (e.g. a convolution and a ``Flatten``).
    weights
        Weights to load, in ``get_weights()`` order (None: the seeded initialisation).
    seed
        When given, ``keras.utils.set_random_seed(seed)`` first: the initialisation, and a training that follows,
        are reproducible.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    widths = [int(hidden_units)] if isinstance(hidden_units, (int, np.integer)) else [int(w) for w in hidden_units]
    names: List[Optional[str]] = list(layer_names) if layer_names is not None else [None] * (len(widths) + 1)
    if len(names) != len(widths) + 1:
        raise ValueError(f"layer_names must name the {len(widths) + 1} Dense layers, got {len(names)} names.")
    regularizer = keras.regularizers.L2(l2) if l2 is not None else None
    shape = tuple(int(size) for size in input_shape)
    layers: List[Any] = [keras.Input(shape)] + list(stem)
    if not stem and len(shape) != 1:
        layers.append(keras.layers.Flatten())
    layers += [keras.layers.Dense(width, activation=activation, kernel_regularizer=regularizer, name=name)
               for width, name in zip(widths, names)]
    layers.append(keras.layers.Dense(int(nb_classes), use_bias=output_bias, kernel_regularizer=regularizer,
                                     name=names[-1]))
    model = keras.Sequential(layers)
    if weights is not None:
        model.set_weights(weights)
    return model


def compile_classifier(model: keras.Model, sparse_labels: bool, learning_rate: float = 1e-2,
                       optimizer: Optional[keras.optimizers.Optimizer] = None, metrics: Sequence[str] = ()) -> None:
    """Compile ``model`` (logits output) with the cross-entropy: sparse for integer labels, categorical for one-hot
    ones; Adam with ``learning_rate`` unless an ``optimizer`` is given."""
    loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if sparse_labels
            else keras.losses.CategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(learning_rate), loss=loss,
                  metrics=list(metrics))


def train_classifier(model: keras.Model, inputs: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int = 64,
                     learning_rate: float = 1e-2, optimizer: Optional[keras.optimizers.Optimizer] = None,
                     metrics: Sequence[str] = (), shuffle: bool = True,
                     callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 0) -> keras.callbacks.History:
    """Compile (:func:`compile_classifier`) and fit ``model``.

    Parameters
    ----------
    model
        A classifier returning logits.
    inputs, labels
        Training arrays; labels (N,) integer classes or (N, C) one-hot rows.
    epochs, batch_size, shuffle, callbacks, verbose
        As ``keras.Model.fit``.
    learning_rate, optimizer, metrics
        As :func:`compile_classifier`.

    Returns
    -------
    keras.callbacks.History
        What ``fit`` returns. Seed first (``build_mlp(seed=...)``) for a reproducible training.
    """
    compile_classifier(model, np.ndim(labels) == 1, learning_rate, optimizer, metrics)
    return model.fit(inputs, labels, batch_size=batch_size, epochs=epochs, shuffle=shuffle, verbose=verbose,
                     callbacks=list(callbacks))
