"""The models of the zoo: small, seeded builders of the architectures users bring to the library.

Each builder returns a :class:`ZooModel`: the Keras model, the layers to watch, a data generator, the per-sample loss
and, when the model ends with a bias-free ``Dense`` layer (what the representer-point methods need), a function
computing that layer's input (the features ``z``) written independently of the library.

The tables :data:`METHODS`, :data:`NOT_APPLICABLE` and :data:`KNOWN_FAILURES` drive both the tests
(``test_zoo.py``) and the support matrix of ``docs/models.md``.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import keras
import numpy as np

METHODS = ("gradients", "tracin", "exact", "cg", "lissa", "arnoldi", "rps_l2", "rps_lje")

MODEL_NAMES = ("resnet", "transformer", "lstm", "two_inputs_list", "two_inputs_dict", "subclassed", "nested",
               "sequential_add", "dropout", "float64", "mixed_bfloat16", "attention_minimal")

RPS_NEEDS_BIAS_FREE_DENSE = ("the representer-point methods decompose the logits of a last Dense layer without bias; "
                             "this model's last Dense layer has a bias, so the library raises ValueError")

# (model, method) pairs that do not apply, with the reason; the case then checks that the library refuses clearly
# (ValueError) instead of computing something else. docs/models.md shows the same list.
NOT_APPLICABLE: Dict[Tuple[str, str], str] = {
    ("lstm", "rps_l2"): RPS_NEEDS_BIAS_FREE_DENSE,
    ("lstm", "rps_lje"): RPS_NEEDS_BIAS_FREE_DENSE,
}

# (model, method) pairs that fail today because of a library bug, with the failure; marked xfail(strict=True) so
# that the fix makes the test fail until the entry is removed (here and in docs/models.md).
KNOWN_FAILURES: Dict[Tuple[str, str], str] = {}

METHOD_TITLES = {"gradients": "per-sample gradients", "tracin": "TracIn", "exact": "exact IF", "cg": "CG IF",
                 "lissa": "LiSSA IF", "arnoldi": "Arnoldi IF", "rps_l2": "RPS-L2", "rps_lje": "RPS-LJE"}

MODEL_DESCRIPTIONS = {
    "resnet": ("Conv2D, BatchNormalization, residual Add, MaxPooling2D, GlobalAveragePooling2D, Dense",
               "`conv2` … `head` (P = 78)"),
    "transformer": ("int tokens, Embedding + learned positions, MultiHeadAttention, LayerNormalization, "
                    "feed-forward, GlobalAveragePooling1D, Dense", "`ln2` … `head` (P = 96)"),
    "lstm": ("LSTM (unrolled), Dense with a bias", "`head` (P = 21); gradients also of every weight (P = 261)"),
    "two_inputs_list": ("Functional, two inputs as a list (fed as a tuple), Concatenate", "`hidden` … `head` (P = 96)"),
    "two_inputs_dict": ("Functional, two inputs as a dict", "`hidden` … `head` (P = 96)"),
    "subclassed": ("subclassed `keras.Model` (no graph)", "`middle` … `head` (P = 72)"),
    "nested": ("Sequential block inside a Functional model", "`block` (whole) … `head` (P = 92)"),
    "sequential_add": ("Sequential built with `.add()` and `build()`", "`hidden` … `head` (P = 80)"),
    "dropout": ("Dropout (inference mode)", "`hidden` … `head` (P = 80)"),
    "float64": ("float64 inputs, weights and loss", "`hidden` … `head` (P = 80)"),
    "mixed_bfloat16": ("`mixed_bfloat16` policy, float32 output layer", "`hidden` … `head` (P = 80)"),
    "attention_minimal": ("MultiHeadAttention on 64 × 64 inputs (the former crash)",
                          "last Dense (P = 256); gradients also of every weight (P = 16,896)"),
}


def support_matrix() -> str:
    """The Markdown support matrix of the zoo (shown on docs/models.md): ✓ tested against the ground truth,
    "n/a" does not apply (the library refuses with ValueError), "✗" known failure; numbered notes give the
    reasons."""
    notes: Dict[str, int] = {}

    def note(text: str) -> int:
        return notes.setdefault(text, len(notes) + 1)

    lines = ["| model | exercises | watched layers | " + " | ".join(METHOD_TITLES[m] for m in METHODS) + " |",
             "|:--|:--|:--|" + "|".join(":-:" for _ in METHODS) + "|"]
    for model in MODEL_NAMES:
        cells = []
        for method in METHODS:
            if (model, method) in NOT_APPLICABLE:
                cells.append(f"n/a ({note(NOT_APPLICABLE[(model, method)])})")
            elif (model, method) in KNOWN_FAILURES:
                cells.append(f"✗ ({note('known failure: ' + KNOWN_FAILURES[(model, method)])})")
            else:
                cells.append("✓")
        exercises, watched = MODEL_DESCRIPTIONS[model]
        lines.append(f"| `{model}` | {exercises} | {watched} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"{number}. {text}" for text, number in notes.items())
    return "\n".join(lines) + "\n"


Inputs = Union[np.ndarray, Tuple[np.ndarray, ...], Dict[str, np.ndarray]]


@dataclass
class ZooModel:
    """A model of the zoo and what the ground truths need to know about it.

    Attributes
    ----------
    model
        The built Keras model (weights drawn from the builder's seed).
    start_layer, last_layer
        The watched range of ``model.layers`` (``InfluenceModel(model, start_layer, last_layer)``).
    data
        ``data(n, seed) -> (inputs, one-hot labels)``: inputs are an array, a tuple (list inputs) or a dict.
    loss
        Per-sample loss (logits in, ``reduction=None``), in the dtype of the watched weights.
    features
        ``features(inputs) -> z (B, D)``, the input of the last ``Dense(C, use_bias=False)`` layer, or None when the
        model does not end with one.
    precision
        ``"float32"``, ``"float64"`` or ``"bfloat16"``: selects the tolerances.
    """

    model: keras.Model
    start_layer: Union[int, str]
    last_layer: Optional[Union[int, str]]
    data: Callable[[int, int], Tuple[Inputs, np.ndarray]]
    loss: Callable
    features: Optional[Callable[[Any], Any]]
    precision: str = "float32"


def _labels(rng: np.random.Generator, n: int, n_classes: int, dtype: str = "float32") -> np.ndarray:
    return np.eye(n_classes, dtype=dtype)[rng.integers(0, n_classes, n)]


def _normal_data(shape: Tuple[int, ...], n_classes: int, dtype: str = "float32") -> Callable:
    def data(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return rng.normal(size=(n,) + shape).astype(dtype), _labels(rng, n, n_classes, dtype)

    return data


def _cce(dtype: str = "float32") -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype=dtype)


def _input_of_last_layer(model: keras.Model) -> Callable:
    """``z`` by a second functional model sharing the layers (not the library's splitting code)."""
    try:
        inputs = model.input  # keeps the structure of several inputs (list or dict)
    except (AttributeError, ValueError):
        inputs = model.inputs[0]
    extractor = keras.Model(inputs, model.layers[-1].input)
    return lambda inputs: extractor(inputs, training=False)


def _randomize_batch_norm(model: keras.Model, seed: int) -> None:
    """Give the BatchNormalization statistics non-trivial values (inference mode uses them)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = int(layer.moving_mean.shape[0])
            layer.moving_mean.assign(rng.normal(scale=0.2, size=size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size=size).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=size).astype("float32"))
            layer.beta.assign(rng.normal(scale=0.2, size=size).astype("float32"))


def resnet(seed: int = 0) -> ZooModel:
    """Conv2D -> BN -> ReLU -> [Conv2D 1x1 -> BN] + skip -> ReLU -> MaxPool -> GAP -> Dense(4, no bias).

    Watched: from the second convolution to the head (Conv2D, BatchNormalization, Add, pooling, Dense), P = 78.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    skip = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(6, 1, name="conv2")(skip)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Add(name="residual")([skip, h])
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(4, use_bias=False, name="head")(h)
    model = keras.Model(inputs, outputs, name="zoo_resnet")
    _randomize_batch_norm(model, seed)
    return ZooModel(model, "conv2", "head", _normal_data((8, 8, 3), 4), _cce(), _input_of_last_layer(model))


class TokenAndPositionEmbedding(keras.layers.Layer):  # pylint: disable=abstract-method,too-many-ancestors
    """Token embedding plus a learned positional embedding."""

    def __init__(self, vocabulary: int, length: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.length, self.dim = vocabulary, length, dim
        self.token = keras.layers.Embedding(vocabulary, dim)
        self.position = keras.layers.Embedding(length, dim)

    def call(self, tokens):  # pylint: disable=arguments-differ
        """(B, L) integers -> (B, L, dim)."""
        positions = keras.ops.arange(keras.ops.shape(tokens)[-1])
        return self.token(tokens) + keras.ops.expand_dims(self.position(positions), 0)

    def get_config(self) -> dict:
        """Constructor arguments (the layer can be cloned)."""
        return {**super().get_config(), "vocabulary": self.vocabulary, "length": self.length, "dim": self.dim}


def transformer(seed: int = 0) -> ZooModel:
    """Integer tokens -> embeddings -> one encoder block (MHA, Add & LayerNorm, feed-forward, Add & LayerNorm) ->
    mean pooling -> Dense(4, no bias).

    Watched: the last LayerNormalization, the pooling and the head, P = 32 + 64 = 96.
    """
    keras.utils.set_random_seed(seed)
    vocabulary, length, dim = 20, 8, 16
    tokens = keras.Input((length,), dtype="int32")
    h = TokenAndPositionEmbedding(vocabulary, length, dim, name="embedding")(tokens)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="attention")(h, h)
    h = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add(name="add1")([h, attention]))
    forward = keras.layers.Dense(32, activation="relu", name="ffn1")(h)
    forward = keras.layers.Dense(dim, name="ffn2")(forward)
    h = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add(name="add2")([h, forward]))
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = keras.layers.Dense(4, use_bias=False, name="head")(h)
    model = keras.Model(tokens, outputs, name="zoo_transformer")

    def data(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return rng.integers(0, vocabulary, (n, length)).astype("int32"), _labels(rng, n, 4)

    return ZooModel(model, "ln2", "head", data, _cce(), _input_of_last_layer(model))


def lstm(seed: int = 0) -> ZooModel:
    """Sequences (5 steps, 3 features) -> LSTM(6) -> Dense(3) with a bias.

    Watched: the head (P = 21); the gradients check also watches every weight, the LSTM's included. The LSTM is
    unrolled: with its default while loop the same checks pass but compiling the derivatives of the loop takes
    three times longer (44 s instead of 16 s of CPU for this model), too slow for this suite."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(6, unroll=True, name="lstm"),
                              keras.layers.Dense(3, name="head")], name="zoo_lstm")
    return ZooModel(model, "head", None, _normal_data((5, 3), 3), _cce(), None)


def _two_inputs(seed: int) -> Tuple[keras.Input, keras.Input, Any]:
    keras.utils.set_random_seed(seed)
    first, second = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Concatenate(name="concat")([keras.layers.Dense(6, activation="relu", name="dense_a")(first),
                                                 keras.layers.Dense(6, activation="relu", name="dense_b")(second)])
    h = keras.layers.Dense(6, activation="relu", name="hidden")(h)
    return first, second, keras.layers.Dense(3, use_bias=False, name="head")(h)


def _two_inputs_data(as_dict: bool) -> Callable:
    def data(n: int, seed: int) -> Tuple[Inputs, np.ndarray]:
        rng = np.random.default_rng(seed)
        first = rng.normal(size=(n, 5)).astype("float32")
        second = rng.normal(size=(n, 3)).astype("float32")
        inputs = {"a": first, "b": second} if as_dict else (first, second)
        return inputs, _labels(rng, n, 3)

    return data


def two_inputs_list(seed: int = 0) -> ZooModel:
    """Functional model with a list of two inputs (fed as a tuple). Watched: hidden Dense and head, P = 78 + 18."""
    first, second, outputs = _two_inputs(seed)
    model = keras.Model([first, second], outputs, name="zoo_two_inputs_list")
    return ZooModel(model, "hidden", "head", _two_inputs_data(False), _cce(), _input_of_last_layer(model))


def two_inputs_dict(seed: int = 0) -> ZooModel:
    """Functional model with a dict of two inputs. Watched: hidden Dense and head, P = 78 + 18."""
    first, second, outputs = _two_inputs(seed)
    model = keras.Model({"a": first, "b": second}, outputs, name="zoo_two_inputs_dict")
    return ZooModel(model, "hidden", "head", _two_inputs_data(True), _cce(), _input_of_last_layer(model))


class SubclassedClassifier(keras.Model):  # pylint: disable=abstract-method,too-many-ancestors
    """Dense(8, relu) -> Dense(6, relu) -> Dense(3, no bias), written as a subclassed model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.middle = keras.layers.Dense(6, activation="relu", name="middle")
        self.head = keras.layers.Dense(3, use_bias=False, name="head")

    def features(self, inputs):
        """The input of the head: (B, 6)."""
        return self.middle(self.hidden(inputs))

    def call(self, inputs, training=False):  # pylint: disable=arguments-differ,unused-argument
        """Logits (B, 3)."""
        return self.head(self.features(inputs))


def subclassed(seed: int = 0) -> ZooModel:
    """A subclassed model built by calling it once. Watched: the last two Dense layers, P = 54 + 18."""
    keras.utils.set_random_seed(seed)
    model = SubclassedClassifier(name="zoo_subclassed")
    model(np.zeros((1, 5), "float32"))
    return ZooModel(model, "middle", "head", _normal_data((5,), 3), _cce(), model.features)


def nested(seed: int = 0) -> ZooModel:
    """A Sequential block inside a Functional model. Watched: the whole block (as one layer) and the head,
    P = 42 + 35 + 15."""
    keras.utils.set_random_seed(seed)
    block = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, activation="relu"),
                              keras.layers.Dense(5, activation="tanh")], name="block")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, use_bias=False, name="head")(block(inputs))
    model = keras.Model(inputs, outputs, name="zoo_nested")
    return ZooModel(model, "block", "head", _normal_data((6,), 3), _cce(), lambda x: block(x, training=False))


def sequential_add(seed: int = 0) -> ZooModel:
    """A Sequential model built with ``.add()`` (no Input object; built with ``build``). Watched: both Dense
    layers, P = 56 + 24."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(name="zoo_sequential_add")
    model.add(keras.layers.Dense(8, activation="tanh", name="hidden"))
    model.add(keras.layers.Dense(3, use_bias=False, name="head"))
    model.build((None, 6))
    return ZooModel(model, "hidden", "head", _normal_data((6,), 3), _cce(), model.get_layer("hidden"))


def dropout(seed: int = 0) -> ZooModel:
    """Dense -> Dropout(0.5) -> Dense(3, no bias): the library evaluates in inference mode (dropout off).
    Watched: both Dense layers and the Dropout between them, P = 56 + 24."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                              keras.layers.Dropout(0.5, name="dropout"),
                              keras.layers.Dense(3, use_bias=False, name="head")], name="zoo_dropout")
    return ZooModel(model, "hidden", "head", _normal_data((6,), 3), _cce(), _input_of_last_layer(model))


def float64(seed: int = 0) -> ZooModel:
    """A float64 model (inputs, weights, loss). Watched: both Dense layers, P = 56 + 24."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,), dtype="float64"),
                              keras.layers.Dense(8, activation="tanh", dtype="float64", name="hidden"),
                              keras.layers.Dense(3, use_bias=False, dtype="float64", name="head")],
                             name="zoo_float64")
    return ZooModel(model, "hidden", "head", _normal_data((6,), 3, "float64"), _cce("float64"),
                    _input_of_last_layer(model), precision="float64")


def mixed_bfloat16(seed: int = 0) -> ZooModel:
    """Built under the ``mixed_bfloat16`` policy (float32 weights, bfloat16 computations), with the output layer
    in float32 as Keras recommends; the global policy is restored afterwards. Watched: both Dense layers,
    P = 56 + 24."""
    keras.utils.set_random_seed(seed)
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                                  keras.layers.Dense(3, use_bias=False, dtype="float32", name="head")],
                                 name="zoo_mixed_bfloat16")
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    return ZooModel(model, "hidden", "head", _normal_data((6,), 3), _cce(), _input_of_last_layer(model),
                    precision="bfloat16")


def attention_minimal(seed: int = 0) -> ZooModel:
    """The minimal reproduction of the MultiHeadAttention crash of per-sample gradients (64 × 64 inputs, 4 heads).
    Watched: the bias-free head, P = 256 (the gradients check also watches every weight, MHA included)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64, 64))
    h = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(4, use_bias=False)(h)
    model = keras.Model(inputs, outputs, name="zoo_attention_minimal")
    return ZooModel(model, -1, None, _normal_data((64, 64), 4), _cce(), _input_of_last_layer(model))


BUILDERS: Dict[str, Callable[[int], ZooModel]] = {
    "resnet": resnet, "transformer": transformer, "lstm": lstm, "two_inputs_list": two_inputs_list,
    "two_inputs_dict": two_inputs_dict, "subclassed": subclassed, "nested": nested, "sequential_add": sequential_add,
    "dropout": dropout, "float64": float64, "mixed_bfloat16": mixed_bfloat16, "attention_minimal": attention_minimal,
}
assert tuple(BUILDERS) == MODEL_NAMES
assert set(MODEL_DESCRIPTIONS) == set(MODEL_NAMES)

if __name__ == "__main__":
    print(support_matrix(), end="")
