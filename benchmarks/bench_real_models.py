"""Cost of every method at real shapes, as ratios to one plain batched forward + backward epoch of the same run.

Models (synthetic data, weights as initialised: costs do not depend on training):

* a ResNet-style CNN of ~0.33 M parameters (Conv2D + BatchNormalization + residual adds, 32×32×3 inputs, 10
  classes, a bias-free last Dense so that RPS applies), at N = 1,000 and 10,000 (``--quick``: N = 1,000 only);
* a small transformer encoder classifier (Embedding, a learned position weight, 2 blocks of MultiHeadAttention,
  LayerNormalization and a feed-forward network, 32 tokens, ~0.13 M parameters).

Methods (public API; all weights watched unless said): per-sample gradients of the whole dataset (streamed, not
kept), TracIn self-influence and top-k (one checkpoint, 16 test samples, k = 5) with the factored per-layer
products and with materialised per-sample gradients (the path every model with a convolution took before), and on
the last layer: exact, CG and Arnoldi influence (self-influence of the training set) and RPS-L2.

Then ``ExactIHVP``'s memory estimate (``estimate_exact_hessian_bytes``) beside the measured peak RSS increase of
building it on scikit-learn's digits with an MLP at P ≈ 2 k, 5 k and 13 k watched parameters, each in a fresh
subprocess (``--quick``: 2 k and 5 k).

Usage: ``.venv/bin/python benchmarks/bench_real_models.py [--quick] [--sizes 1000 10000] [--batch-size 128]``
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import PeakMemory, plain_step  # noqa: E402  pylint: disable=wrong-import-position,C0413

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


# Models ------------------------------------------------------------------------------------------------------------
def _conv_bn(tensor: Any, filters: int, strides: int = 1, relu: bool = True) -> Any:
    tensor = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(tensor)
    tensor = keras.layers.BatchNormalization()(tensor)
    return keras.layers.ReLU()(tensor) if relu else tensor


def resnet(seed: int = 0) -> keras.Model:
    """Stem (32) and three stages (32, 64, 96 channels) of one residual block each: ~0.33 M parameters."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    hidden = _conv_bn(inputs, 32)
    for stage, filters in enumerate((32, 64, 96)):
        if stage:
            hidden = _conv_bn(hidden, filters, strides=2)
        branch = _conv_bn(_conv_bn(hidden, filters), filters, relu=False)
        hidden = keras.layers.ReLU()(keras.layers.Add()([hidden, branch]))
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(10, use_bias=False)(hidden))


class PositionWeight(keras.layers.Layer):  # pylint: disable=abstract-method,too-many-ancestors
    """A learned (T, D) position embedding added to the token embeddings."""

    def build(self, input_shape):
        self.positions = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal", name="positions")

    def call(self, inputs):  # pylint: disable=arguments-differ
        return inputs + self.positions


def transformer(seed: int = 0, vocabulary: int = 1000, length: int = 32, width: int = 64) -> keras.Model:
    """Embedding + position weight, two post-norm encoder blocks (4 heads, FFN 128), mean pooling, bias-free head."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((length,), dtype="int32")
    hidden = PositionWeight()(keras.layers.Embedding(vocabulary, width)(tokens))
    for _ in range(2):
        attended = keras.layers.MultiHeadAttention(4, width // 4)(hidden, hidden)
        hidden = keras.layers.LayerNormalization()(hidden + attended)
        forward = keras.layers.Dense(width)(keras.layers.Dense(2 * width, activation="relu")(hidden))
        hidden = keras.layers.LayerNormalization()(hidden + forward)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(tokens, keras.layers.Dense(10, use_bias=False)(hidden))


def synthetic(model_name: str, count: int, seed: int) -> tuple:
    """(inputs, labels) drawn at random: 32×32×3 images or 32 tokens of 1,000."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.int32)
    if model_name == "resnet":
        return rng.normal(size=(count, 32, 32, 3)).astype(np.float32), labels
    return rng.integers(0, 1000, (count, 32)).astype(np.int32), labels


# Measuring ---------------------------------------------------------------------------------------------------------
def measure(function: Callable[[], Any]) -> Dict[str, float]:
    """Seconds and peak RSS increase (MiB) of one call."""
    with PeakMemory() as peak:
        start = time.perf_counter()
        function()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak.delta_mib}


def consume(dataset: tf.data.Dataset) -> None:
    """Evaluate every element of a (lazy) result dataset."""
    for _ in dataset:
        pass


def unfactored_influence_model(model: keras.Model) -> Any:
    """An influence model over every weight of ``model`` that offers TracIn no per-layer factors, so TracIn takes
    its generic path (materialised per-sample gradients)."""
    from deel.influenciae.common import InfluenceModel  # pylint: disable=import-outside-toplevel

    class UnfactoredInfluenceModel(InfluenceModel):  # pylint: disable=too-many-ancestors
        """:class:`InfluenceModel` without ``layer_factors``."""

        @property
        def layer_factors(self) -> None:
            return None

    return UnfactoredInfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)


def run_model(model_name: str, count: int, batch_size: int, quick: bool) -> List[Dict[str, Any]]:
    """Every method on one model and dataset size; rows of the table."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
    from deel.influenciae.rps import RepresenterPointL2
    from deel.influenciae.trac_in import TracIn

    model = resnet() if model_name == "resnet" else transformer()
    x, y = synthetic(model_name, count, 1)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    test = tf.data.Dataset.from_tensor_slices(synthetic(model_name, 16, 2)).batch(16)
    step = plain_step(model, LOSS)
    rows: List[Dict[str, Any]] = []

    def epoch():
        for inputs, targets in train:
            step(inputs, targets).numpy()

    epoch()  # trace
    baseline = min(measure(epoch)["seconds"] for _ in range(1 if quick else 2))

    def add(name: str, function: Callable[[], Any], warm: Callable[[], Any] = None) -> None:
        if warm is not None:
            warm()
        try:
            result = measure(function)
        except Exception as error:  # pylint: disable=broad-except  # a benchmark reports, it does not stop
            rows.append({"model": model_name, "N": count, "method": name, "error": f"{type(error).__name__}: "
                                                                                  f"{str(error)[:120]}"})
            print(f"  {name}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            return
        result.update({"model": model_name, "N": count, "method": name, "epochs": result["seconds"] / baseline})
        rows.append(result)
        print(f"  {name:42s} {result['seconds']:8.2f} s {result['epochs']:7.2f} epochs "
              f"{result['peak_mib']:9.1f} MiB", flush=True)

    batches = int(train.cardinality())
    first = train.take(1).concatenate(train.skip(batches - 1))  # warm-up: a full batch and the short last one
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)
    print(f"{model_name}: N = {count}, P = {influence_model.nb_params:,}, batch {batch_size}; plain epoch "
          f"{baseline:.2f} s", flush=True)
    rows.append({"model": model_name, "N": count, "method": "plain forward+backward epoch", "seconds": baseline,
                 "epochs": 1.0, "peak_mib": float("nan"), "P": influence_model.nb_params})

    def per_sample():
        for batch in train:
            influence_model.batch_jacobian_tensor(tuple(batch)).numpy()

    add("per-sample gradients (streamed)", per_sample,
        lambda: [influence_model.batch_jacobian_tensor(tuple(batch)) for batch in first])
    tracin = TracIn([influence_model], 0.01)
    add("TracIn self-influence (factored)", lambda: consume(tracin.compute_influence_values(train)),
        lambda: consume(tracin.compute_influence_values(first)))
    add("TracIn top-k (factored, 16 tests, k=5)", lambda: consume(tracin.top_k(test, train, k=5)),
        lambda: consume(tracin.top_k(test, first, k=5)))
    # The path every model with a convolution took before the factored products: generic per-sample gradients.
    materialised = TracIn([unfactored_influence_model(model)], 0.01)
    add("TracIn self-influence (materialised, before)", lambda: consume(materialised.compute_influence_values(train)),
        lambda: consume(materialised.compute_influence_values(first)))
    add("TracIn top-k (materialised, before)", lambda: consume(materialised.top_k(test, train, k=5)),
        lambda: consume(materialised.top_k(test, first, k=5)))

    last = InfluenceModel(model, start_layer=-1, last_layer=-1, loss_function=LOSS)
    for solver in ("exact", "cgd"):
        add(f"influence {solver} (last layer, P={last.nb_params})",
            lambda solver=solver: consume(FirstOrderInfluenceCalculator(last, train, solver, regularization=1e-3)
                                          .compute_influence_values(train)))
    add("influence Arnoldi (last layer, 20/10)",
        lambda: consume(ArnoldiInfluenceCalculator(last, train, 20, True, 10).compute_influence_values(train)))
    add("RPS-L2 (fit 30 epochs + self-influence)",
        lambda: consume(RepresenterPointL2(model, train, LOSS, epochs=30).compute_influence_values(train)))
    return rows


# ExactIHVP memory --------------------------------------------------------------------------------------------------
def exact_memory_child(hidden: int) -> None:
    """In a fresh process: build ExactIHVP for a digits MLP 64-hidden-10 (all weights) and print the estimate
    beside the peak RSS increase, as one JSON line."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.benchmark.digits import build_mlp, load_digits_arrays
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.common.inverse_hessian_vector_product import ExactIHVP, estimate_exact_hessian_bytes

    inputs, labels = load_digits_arrays()
    model = build_mlp(hidden_units=hidden, activation="tanh", seed=0)
    train = tf.data.Dataset.from_tensor_slices((inputs, labels.astype(np.int32))).batch(256)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)
    influence_model.batch_jacobian_tensor(tuple(next(iter(train))))  # TensorFlow's own start-up memory first
    size = influence_model.nb_params
    with PeakMemory() as peak:
        start = time.perf_counter()
        ExactIHVP(influence_model, train, memory_budget_bytes=1 << 40)
        seconds = time.perf_counter() - start
    print(json.dumps({"P": size, "estimate_mib": estimate_exact_hessian_bytes(size, tf.float32, True) / 2 ** 20,
                      "peak_mib": peak.delta_mib, "seconds": seconds}))


def exact_memory(hiddens: List[int]) -> List[Dict[str, Any]]:
    """One subprocess per hidden width; rows of P, estimate, measured peak and seconds."""
    rows = []
    for hidden in hiddens:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--exact-child", str(hidden)],
                              capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"  hidden {hidden}: failed: {done.stderr.strip()[-300:]}", flush=True)
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        print(f"  P = {row['P']:6,d}: estimate {row['estimate_mib']:9.1f} MiB, measured peak {row['peak_mib']:9.1f} "
              f"MiB (ratio {row['peak_mib'] / row['estimate_mib']:.2f}), {row['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    """Command line: the models' tables, then the ExactIHVP memory check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 only, P ≈ 2 k and 5 k for ExactIHVP")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="dataset sizes of the CNN")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["resnet", "transformer"])
    parser.add_argument("--skip-exact", action="store_true", help="skip the ExactIHVP memory check")
    parser.add_argument("--json", default=None, help="write every row there")
    parser.add_argument("--exact-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exact_child is not None:
        exact_memory_child(args.exact_child)
        return
    sizes = args.sizes or ([1000] if args.quick else [1000, 10000])
    rows: List[Dict[str, Any]] = []
    for model_name in args.models:
        for count in (sizes if model_name == "resnet" else sizes[:1]):
            rows += run_model(model_name, count, args.batch_size, args.quick)
    if not args.skip_exact:
        print("ExactIHVP on digits (MLP 64-h-10, all weights): estimate vs measured peak RSS increase", flush=True)
        rows += exact_memory([30, 70] if args.quick else [30, 70, 175])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
