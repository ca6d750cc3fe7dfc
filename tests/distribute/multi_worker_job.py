"""One worker of the multi-worker tests.

``python -m tests.distribute.multi_worker_job OUTPUT INDEX`` with ``TF_CONFIG`` set (or without it: the
single-device reference) computes the values of several methods on a seeded problem under
``MultiWorkerMirroredStrategy`` and saves them to ``OUTPUT`` (a ``.npz``);
``python -m tests.distribute.multi_worker_job --killed-build INDEX KILL_AT`` builds an index that the second worker
abandons (see :func:`killed_build`)."""
import json
import os
import sys

import numpy as np
import tensorflow as tf


def problem():
    """A seeded classifier and its data: 23 training samples (batches of 5: uneven, not divisible by 2), 7 test."""
    import keras  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(3, use_bias=False)])
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(23, 6)).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 23)]
    train = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(5)
    test = tf.data.Dataset.from_tensor_slices((inputs[:7], labels[:7])).batch(3)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    return model, train, test, loss


def compute(strategy, index_path: str) -> dict:
    """Values of TracIn, first-order exact influence and EK-FAC (self-influence, pairwise, top-k indices), and the
    top-k of a TracIn index built at ``index_path`` (by the chief; other workers only compute)."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.common import EKFACIHVP, InfluenceModel
    from deel.influenciae.influence import FirstOrderInfluenceCalculator
    from deel.influenciae.trac_in import TracIn
    model, train, test, loss = problem()
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss, strategy=strategy)
    calculators = {
        "tracin": TracIn([influence_model], [0.1]),
        "exact": FirstOrderInfluenceCalculator(influence_model, train, "exact", regularization=1e-2),
        "ekfac": FirstOrderInfluenceCalculator(influence_model, train,
                                               EKFACIHVP(influence_model, train, regularization=1e-2)),
    }
    results = {}
    for name, calculator in calculators.items():
        results[f"{name}_self"] = calculator.self_influence(train).numpy()
        results[f"{name}_matrix"] = calculator.influence_matrix(test, train).numpy()
        results[f"{name}_top_k"] = calculator.influence_top_k(test, train, k=4).indices.numpy()
    index = calculators["tracin"].build_index(train, index_path, dtype="float32", shard_size=7)
    if index is not None:
        found = index.top_k(test, 4)
        results["index_values"], results["index_top_k"] = found.values.numpy(), found.indices.numpy()
    return results


def killed_build(index_path: str, kill_at: int) -> None:
    """Build a TracIn index under the strategy; the worker of index 1 kills itself (SIGKILL) when its input pipeline
    reaches training sample ``kill_at``, so the chief loses it in the middle of the build."""
    # pylint: disable=import-outside-toplevel
    import signal
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.trac_in import TracIn
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=20)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    model, train, _, loss = problem()
    inputs, labels = (tensor.numpy() for tensor in next(iter(train.unbatch().batch(1000))))
    victim = json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1

    def samples():
        for position, sample in enumerate(zip(inputs, labels)):
            if victim and position == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield sample

    signature = (tf.TensorSpec(inputs.shape[1:], tf.float32), tf.TensorSpec(labels.shape[1:], tf.float32))
    generated = tf.data.Dataset.from_generator(samples, output_signature=signature).batch(3)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss, strategy=strategy)
    TracIn([influence_model], [0.1]).build_index(generated, index_path, dtype="float32", shard_size=4)


def main(output: str, index_path: str) -> None:
    strategy = None
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        print(json.dumps({"worker": json.loads(os.environ["TF_CONFIG"])["task"],
                          "replicas": strategy.num_replicas_in_sync}), flush=True)
    np.savez(output, **compute(strategy, index_path))


if __name__ == "__main__":
    if sys.argv[1] == "--killed-build":
        killed_build(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2])
