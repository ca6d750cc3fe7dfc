"""Run the reference Influenciae 0.3.0 on a prepared problem and save values and timings.

This script is meant to be executed by ``benchmarks/compare_reference.py`` with the Python
interpreter of the *reference* virtual environment (``benchmarks/.venv-reference``), never with
the project's own environment: the reference package is installed there under the same import
path (``deel.influenciae``) as this project, and it only works with legacy Keras 2 (``tf_keras``),
which is selected by setting ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported.

Input: an ``.npz`` file written by ``compare_reference.py`` holding ``x_train``, ``y_train``
(one-hot), ``x_test``, ``y_test``, the layer widths ``layer_sizes`` (e.g. ``[64, 32, 16, 10]``)
and the dense weights ``weight_0``, ``weight_1``, ... in ``get_weights()`` order.

Output: an ``.npz`` file with the self-influence of the training set (``self_influence``, shape
``(N_train,)``), the pairwise influence matrix of the test set against the training set
(``pairwise``, shape ``(N_test, N_train)``), the pseudo-inverse Hessian (``inv_hessian``), wall
times in seconds of the first pass (``time_hessian``, ``time_self``, ``time_pairwise``) and the median
of the ``--repeats`` passes after it (``warm_*``), and the peak resident set size in MiB after each phase
(``rss_*_mib``).

Example
-------
``TF_USE_LEGACY_KERAS=1 benchmarks/.venv-reference/bin/python benchmarks/reference_runner.py
--input problem.npz --output ref_bs10.npz --batch-size 10``
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

# Legacy Keras must be selected before TensorFlow is imported anywhere in this process.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

# Helpers shared with the driver (NumPy only at module level).
from reference_problem import load_problem, run_phases  # pylint: disable=wrong-import-position

# ``tf.keras`` is the legacy ``tf_keras`` package here, which static analysis cannot resolve.
# pylint: disable=no-member


def build_legacy_mlp(layer_sizes: Sequence[int], weights: List[np.ndarray]) -> "tf.keras.Model":
    """Build the reference MLP with legacy Keras and load the given weights.

    Parameters
    ----------
    layer_sizes
        Input width followed by the width of every Dense layer, e.g. ``[64, 32, 16, 10]``.
        Hidden layers use ReLU; the last layer outputs logits (no activation).
    weights
        The weights in ``get_weights()`` order (kernel then bias of each Dense layer).

    Returns
    -------
    tf.keras.Model
        A built ``tf.keras.Sequential`` model (legacy Keras) holding ``weights``.
    """
    if not tf.keras.Model.__module__.startswith("tf_keras"):
        raise RuntimeError("tf.keras is not legacy Keras (tf_keras); set TF_USE_LEGACY_KERAS=1 before importing TF")
    model = tf.keras.Sequential()
    model.add(tf.keras.Input(shape=(int(layer_sizes[0]),)))
    n_dense = len(layer_sizes) - 1
    for index, width in enumerate(layer_sizes[1:]):
        activation = "relu" if index < n_dense - 1 else None
        model.add(tf.keras.layers.Dense(int(width), activation=activation, name=f"dense_{index}"))
    model.set_weights(weights)
    return model


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batch ``(x, y)`` into a dataset whose last transformation is ``batch``.

    Parameters
    ----------
    x
        Inputs, shape ``(N, D)``.
    y
        One-hot targets, shape ``(N, C)``.
    batch_size
        Batch size; ``N`` must be a multiple of it (the reference assumes full batches).

    Returns
    -------
    tf.data.Dataset
        The batched dataset.
    """
    if x.shape[0] % batch_size != 0:
        raise ValueError(f"{x.shape[0]} samples are not a multiple of the batch size {batch_size}; "
                         "the reference needs full batches")
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y.astype(np.float32))).batch(batch_size)


def reference_self_influence(calculator: Any, train_ds: tf.data.Dataset) -> np.ndarray:
    """Self-influence of every training sample through the reference's public API: its lazy dataset of
    ``(batch, values)`` concatenated, which is what its internal eager helper does.

    Returns
    -------
    np.ndarray
        (N, 1) values.
    """
    return np.concatenate([values.numpy() for _, values in calculator.compute_influence_values(train_ds)], axis=0)


def run_reference(arrays: Dict[str, np.ndarray], weights: List[np.ndarray], batch_size: int,
                  test_batch_size: int, repeats: int = 0) -> Dict[str, np.ndarray]:
    """Compute self-influence and pairwise influence with the reference package.

    Parameters
    ----------
    arrays
        Data arrays (``x_train``, ``y_train``, ``x_test``, ``y_test``) and ``layer_sizes``.
    weights
        Model weights in ``get_weights()`` order.
    batch_size
        Batch size of the training dataset (Hessian, influence vectors, self-influence).
    test_batch_size
        Batch size of the test dataset (pairwise values).
    repeats
        Warm passes after the first one (see ``reference_problem.run_phases``).

    Returns
    -------
    dict
        Arrays and scalars to store in the output ``.npz`` file.
    """
    # The reference package is only importable inside the reference virtual environment.
    # pylint: disable=import-outside-toplevel,import-error,no-name-in-module
    from deel.influenciae.common import ExactIHVP, InfluenceModel
    from deel.influenciae.influence import FirstOrderInfluenceCalculator

    train_ds = make_dataset(arrays["x_train"], arrays["y_train"], batch_size)
    test_ds = make_dataset(arrays["x_test"], arrays["y_test"], test_batch_size)
    loss = tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    influence_model = InfluenceModel(build_legacy_mlp(arrays["layer_sizes"].tolist(), weights), start_layer=-1,
                                     loss_function=loss)

    def build() -> Tuple[Any, Any]:
        ihvp = ExactIHVP(influence_model, train_ds)
        return ihvp, FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)

    ihvp, results = run_phases(build, reference_self_influence, train_ds, test_ds,
                               (arrays["x_test"].shape[0], arrays["x_train"].shape[0]), repeats)
    results.update({"inv_hessian": ihvp.inv_hessian.numpy(), "n_params": np.array(int(influence_model.nb_params)),
                    "batch_size": np.array(batch_size), "test_batch_size": np.array(test_batch_size),
                    "tf_version": np.array(tf.__version__)})
    return results


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv
        Arguments without the program name.

    Returns
    -------
    argparse.Namespace
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--input", required=True, help="problem .npz written by compare_reference.py")
    parser.add_argument("--output", required=True, help="where to write the results (.npz)")
    parser.add_argument("--batch-size", type=int, required=True, help="training batch size")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="test batch size (default: min(batch size, number of test samples))")
    parser.add_argument("--seed", type=int, default=0, help="TensorFlow seed (nothing here is random)")
    parser.add_argument("--repeats", type=int, default=0, help="passes repeated after the first one (warm times)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    """Entry point.

    Parameters
    ----------
    argv
        Arguments without the program name.

    Returns
    -------
    int
        The exit status.
    """
    args = parse_args(argv)
    tf.random.set_seed(args.seed)
    arrays, weights = load_problem(Path(args.input))
    test_batch_size = args.test_batch_size or min(args.batch_size, arrays["x_test"].shape[0])
    results = run_reference(arrays, weights, args.batch_size, test_batch_size, args.repeats)
    np.savez(args.output, **results)
    print(f"reference batch={args.batch_size}: hessian {float(results['time_hessian']):.2f} s, "
          f"self {float(results['time_self']):.2f} s, pairwise {float(results['time_pairwise']):.2f} s, "
          f"peak RSS {float(results['rss_pairwise_mib']):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
