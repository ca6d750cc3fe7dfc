"""Worker for this library's side of the peer benchmark (runs in ``.venv``: TensorFlow 2.21 + Keras 3).

Two jobs:

* ``--train PROBLEM``: train the MLP 64-32-10 on the digits split with Keras 3 (seeded, plain SGD in four
  stages of decreasing learning rate), keep the weights at the end of every stage as a TracIn checkpoint
  and write the problem file (data, checkpoints, learning rates). The last checkpoint is the trained model.
* ``--task T --problem PROBLEM --output OUT``: time one task (``exact``, ``cg``, ``arnoldi``, ``tracin``) and
  write the values, timings and peak RSS.

Every watched parameter is used (all layers, P = 2,410) and the loss is the per-sample softmax cross-entropy;
the Hessian is that of the mean loss over the training set.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order

# pylint: disable=wrong-import-position
from deel.influenciae.benchmark.digits import build_mlp, compile_classifier, load_digits_split  # noqa: E402
from deel.influenciae.common import ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel  # noqa: E402
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator  # noqa: E402
from deel.influenciae.trac_in import TracIn  # noqa: E402

# pylint: enable=wrong-import-position

STAGE_RATES = (0.2, 0.1, 0.05, 0.025)
STAGE_EPOCHS = 5


def build_model(weights: Any = None, seed: Optional[int] = None) -> keras.Model:
    """Keras 3 MLP 64-32-10 (ReLU hidden layer, logits output, Dense layers ``dense_0``, ``dense_1``), optionally
    with given weights or a seeded initialisation."""
    sizes = [int(size) for size in common.LAYER_SIZES]
    return build_mlp((sizes[0],), sizes[1:-1], sizes[-1], layer_names=[f"dense_{index}" for index in
                                                                        range(len(sizes) - 1)],
                     weights=weights, seed=seed)


def train(problem: Path, seed: int) -> None:
    """Train with SGD in four stages and write the problem file (see the module docstring)."""
    data = load_digits_split(seed, n_train=common.N_TRAIN, n_test=common.N_TEST, test_first=False).arrays()
    model = build_model(seed=seed)
    optimizer = keras.optimizers.SGD(learning_rate=STAGE_RATES[0])
    compile_classifier(model, sparse_labels=True, optimizer=optimizer, metrics=["accuracy"])
    checkpoints = []
    for rate in STAGE_RATES:
        optimizer.learning_rate.assign(rate)
        model.fit(data["x_train"], data["y_train"], batch_size=32, epochs=STAGE_EPOCHS, shuffle=True, verbose=0)
        checkpoints.append([np.asarray(weight, np.float32) for weight in model.get_weights()])
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    common.save_problem(problem, data, checkpoints, STAGE_RATES)
    print(f"trained: test accuracy {accuracy:.3f}; checkpoints at the end of epochs "
          f"{[STAGE_EPOCHS * (k + 1) for k in range(len(STAGE_RATES))]} with learning rates {list(STAGE_RATES)}")


def per_sample_loss() -> keras.losses.Loss:
    """Per-sample softmax cross-entropy on integer labels (``reduction=None``, as the library requires)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def make_calculator(task: str, models: List[InfluenceModel], train_ds: tf.data.Dataset,
                    args: argparse.Namespace, rates: np.ndarray) -> Tuple[Any, Any]:
    """Build the calculator of a task (this is the "fit" phase) and return it with its IHVP (or None)."""
    model = models[-1]
    if task == "exact":
        ihvp = ExactIHVP(model, train_ds, regularization=common.REGULARIZATION)
        return FirstOrderInfluenceCalculator(model, train_ds, ihvp_calculator=ihvp), ihvp
    if task == "cg":
        recycle = model.nb_params if args.cg_recycle < 0 else args.cg_recycle
        ihvp = ConjugateGradientDescentIHVP(model, train_dataset=train_ds, n_opt_iters=args.cg_maxiter,
                                            regularization=common.REGULARIZATION, tol=args.cg_rtol, atol=0.0,
                                            recycle_directions=recycle)
        return FirstOrderInfluenceCalculator(model, train_ds, ihvp_calculator=ihvp), ihvp
    if task == "arnoldi":
        calculator = ArnoldiInfluenceCalculator(model, train_ds, subspace_dim=args.krylov, force_hermitian=True,
                                                k_largest_eig_vals=args.rank, regularization=common.REGULARIZATION,
                                                seed=0)
        return calculator, calculator.ihvp_calculator
    if task == "tracin":
        return TracIn(models, [float(rate) for rate in rates]), None
    raise ValueError(f"unknown task {task!r}")


def run_task(args: argparse.Namespace) -> None:
    """Time ``fit``, the pairwise matrix and the self-influence of one task; write the result file."""
    arrays, checkpoints = common.load_problem(args.problem)
    keras_models = [build_model(weights) for weights in checkpoints]
    used = keras_models if args.task == "tracin" else keras_models[-1:]
    models = [InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=per_sample_loss()) for model in used]
    train_ds = tf.data.Dataset.from_tensor_slices((arrays["x_train"], arrays["y_train"])).batch(common.TRAIN_BATCH)
    test_ds = tf.data.Dataset.from_tensor_slices((arrays["x_test"], arrays["y_test"])).batch(common.N_TEST)
    state: Dict[str, Any] = {}

    def fit() -> Any:
        state["calculator"], state["ihvp"] = make_calculator(args.task, models, train_ds, args,
                                                             arrays["learning_rates"])
        return state["calculator"]

    phases: Dict[str, Callable[[], Any]] = {
        "fit": fit,
        "pair": lambda: state["calculator"].estimate_influence_values_matrix(test_ds, train_ds).numpy(),
        "self": lambda: state["calculator"].self_influence(train_ds).numpy(),
    }
    results: Dict[str, Any] = {}
    firsts: Dict[str, float] = {}
    others: Dict[str, List[float]] = {name: [] for name in phases}
    for repeat in range(args.repeats + 1):
        for name, phase in phases.items():
            value, first, _ = common.time_repeats(phase, 0)
            if repeat == 0:
                firsts[name] = first
            else:
                others[name].append(first)
            results[name] = value
    out: Dict[str, Any] = {f"time_{name}": common.summary(firsts[name], others[name]) for name in phases}
    out.update(pair=results["pair"], self=results["self"], rss_mib=np.float64(common.peak_rss_mib()))
    if state["ihvp"] is not None:
        test_grads = models[-1].batch_jacobian_tensor((tf.constant(arrays["x_test"]), tf.constant(arrays["y_test"])))
        out["test_grads"] = test_grads.numpy()
        out["factors"] = tf.transpose(state["ihvp"].apply_inverse(tf.transpose(test_grads))).numpy()
    if args.task == "exact":
        out["hessian"] = state["ihvp"].hessian.numpy().astype(np.float64)
    np.savez(args.output, **out)


def main() -> int:
    """Parse the command line and run the job."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, help="train and write this problem file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("exact", "cg", "arnoldi", "tracin"))
    parser.add_argument("--problem", type=Path)
    parser.add_argument("--output", type=Path)
    common.add_task_options(parser)
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.train is not None:
        train(args.train, args.seed)
        return 0
    if args.task is None or args.problem is None or args.output is None:
        parser.error("--task, --problem and --output are needed unless --train is given")
    run_task(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
