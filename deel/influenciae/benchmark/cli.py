"""Command line of the mislabeled-sample detection benchmark.

``python -m deel.influenciae.benchmark --methods first_order,tracin,loss_ranking --nbr-of-evaluation 3`` (or the
``influenciae-benchmark`` console script) trains one model per evaluation on noisy labels, ranks the training samples
by each method's self-influence and writes, under ``--path-to-save``:

* ``results.json`` and ``results.csv``: per method the detection area (mean ± std over the evaluations), the
  per-evaluation areas and the seconds spent training and computing the influence;
* ``curves.png``: the detection curves (``BenchmarkDisplay.plot_bench``);
* ``{method}.npz`` (``BenchmarkDisplay.save_bench_result``; ``BenchmarkDisplay.load_bench_result(path)`` reads
  them all back) and ``{method}_config.json``.

Options use the ``--long-option`` form; the reference's underscore spellings (``--mislabeling_ratio``,
``-mislabeling_ratio``) are accepted too. Booleans take ``true/false``, ``1/0``, ``yes/no``; given without a
value they mean true.
"""
import argparse
import csv
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..common.solver_registry import registered_solvers, solver_entry, solver_names
from .base_benchmark import require_tensorboard

METHODS = ("first_order", "tracin", "rps_lje", "rps_l2", "boundary_weights", "boundary_sample", "arnoldi",
           "loss_ranking")
ALIASES = {"influence_first_order": "first_order", "loss": "loss_ranking", "first-order": "first_order",
           "rps-lje": "rps_lje", "rps-l2": "rps_l2", "boundary-weights": "boundary_weights",
           "boundary-sample": "boundary_sample", "loss-ranking": "loss_ranking"}
RPS_METHODS = ("rps_lje", "rps_l2")

# Defaults that depend on the dataset (None in the parser): digits / cifar10.
DATASET_DEFAULTS = {
    "digits": {"epochs": 100, "model_type": "mlp", "mislabeling_ratio": 0.1, "train_batch_size": 64,
               "dataset_hessian_size": -1},
    "cifar10": {"epochs": 60, "model_type": "resnet", "mislabeling_ratio": 0.0005, "train_batch_size": 128,
                "dataset_hessian_size": 2000},
}


def str2bool(value: Union[str, bool]) -> bool:
    """Parse ``true/false``, ``1/0``, ``yes/no``, ``y/n``, ``on/off`` (any case).

    Raises
    ------
    argparse.ArgumentTypeError
        For any other string.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on", "t"):
        return True
    if text in ("false", "0", "no", "n", "off", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def layer_spec(value: str) -> Union[int, str]:
    """A layer given by index (``-1``) or by name."""
    try:
        return int(value)
    except ValueError:
        return value


def optional_layer_spec(value: str) -> Optional[Union[int, str]]:
    """:func:`layer_spec`, with ``none``/``default`` for None."""
    return None if value.strip().lower() in ("none", "default", "") else layer_spec(value)


def int_list(value: str) -> List[int]:
    """Comma-separated integers (an empty string is an empty list)."""
    try:
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from error


def solver_name(value: str) -> str:
    """A solver of the registry given by name or alias (any case), as its registered name."""
    try:
        return solver_entry(value.strip()).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"unknown solver {value!r}; choose among {', '.join(solver_names())}") \
            from error


def method_list(value: str) -> List[str]:
    """Comma-separated method names, checked and de-aliased."""
    names = []
    for part in value.split(","):
        part = part.strip().lower()
        if not part:
            continue
        name = ALIASES.get(part, part)
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {part!r}; choose among {', '.join(METHODS)}")
        names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("no method given")
    return names


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add ``--name-with-dashes`` plus the underscore spellings ``--name_with`` and ``-name_with``."""
    underscored = name.replace("-", "_")
    flags = [f"--{name}"]
    if underscored != name:
        flags.append(f"--{underscored}")
    flags.append(f"-{underscored}")
    parser.add_argument(*flags, dest=underscored, **kwargs)


def _add_bool(parser: argparse.ArgumentParser, name: str, default: Optional[bool], help_text: str) -> None:
    _add(parser, name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the benchmark."""
    parser = argparse.ArgumentParser(prog="influenciae-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    data = parser.add_argument_group("data and training")
    _add(data, "dataset", choices=("digits", "cifar10"), default="digits", help="benchmark dataset (default digits)")
    _add(data, "data-path", default=None, help="CIFAR-10 folder (cifar-10-batches-py or its parent)")
    _add_bool(data, "allow-download", False, "download CIFAR-10 if missing (network; default false)")
    _add(data, "epochs", type=int, default=None, help="training epochs (digits 100, cifar10 60)")
    _add(data, "model-type", default=None, help="digits: mlp|cnn (mlp); cifar10: resnet|efficient_net|vgg19")
    _add(data, "mislabeling-ratio", type=float, default=None,
         help="probability that a training label is changed (digits 0.1, cifar10 0.0005)")
    _add_bool(data, "use-regu", False, "L2 / L1L2 regularisation of the model (default false)")
    _add_bool(data, "use-bias", None, "bias of the last layer (default: digits false; cifar10 true except RPS)")
    _add_bool(data, "force-overfit", False, "cifar10: SGD schedule that overfits (default false)")
    _add(data, "train-batch-size", type=int, default=None, help="training batch size (digits 64, cifar10 128)")
    _add(data, "test-batch-size", type=int, default=128, help="test batch size (128)")
    _add(data, "influence-batch-size", type=int, default=None, help="batch size of the influence computations "
                                                                    "(default: the training batch size)")
    _add(data, "epochs-to-save", type=int_list, default=None,
         help="0-based epochs of the TracIn checkpoints, comma separated (digits: 5 evenly spaced; cifar10: the "
              "last epoch)")
    _add(data, "take-batch", type=int, default=-1,
         help="keep only the first N samples of the training and test sets (-1: all); alias --train-size")
    data.add_argument("--train-size", "--train_size", dest="take_batch", type=int, help=argparse.SUPPRESS)
    _add(data, "hidden-units", type=int, default=64, help="digits: width of the hidden layer (64)")
    _add(data, "learning-rate", type=float, default=3e-3, help="digits: Adam learning rate (3e-3)")
    _add_bool(data, "verbose-training", False, "Keras progress output (default false)")

    run = parser.add_argument_group("run")
    _add(run, "methods", type=method_list, default=None,
         help=f"comma-separated methods among {', '.join(METHODS)}")
    _add(run, "method-name", type=method_list, default=None, help="one method (the reference's option)")
    _add(run, "nbr-of-evaluation", type=int, default=3, help="evaluations (seeds) per method (3)")
    _add(run, "seed", type=int, default=0, help="first seed (0)")
    _add(run, "path-to-save", default="./results/", help="output folder (./results/)")
    _add_bool(run, "use-tensorboard", False, "TensorBoard logs (default false)")
    _add_bool(run, "quiet", False, "only print the final table")

    methods = parser.add_argument_group("methods")
    _add(methods, "ihvp-mode", type=solver_name, choices=solver_names(), default="exact",
         help="first_order / rps_lje solver (exact): " + "; ".join(
             f"{entry.name}: {entry.description}" if entry.description else entry.name
             for entry in registered_solvers()))
    _add(methods, "start-layer", type=layer_spec, default=-1, help="first_order / arnoldi watched layer (-1)")
    _add(methods, "dataset-hessian-size", type=int, default=None,
         help="samples of the Hessian (-1: all; digits -1, cifar10 2000)")
    _add(methods, "n-opt-iters", type=int, default=100, help="iterations of the iterative solvers, CGD / LiSSA (100)")
    _add(methods, "feature-extractor", type=layer_spec, default=-1,
         help="first layer of the head of the iterative solvers, CGD / LiSSA (-1)")
    _add(methods, "regularization", type=float, default=0.0,
         help="damping λ of (H + λI) for first_order, arnoldi and rps_lje (0)")
    _add(methods, "lambda-regularization", type=float, default=1e-3, help="rps_l2 λ (1e-3)")
    _add(methods, "scaling-factor", type=float, default=0.1, help="rps_l2 line-search constant (0.1)")
    _add(methods, "layer-index", type=layer_spec, default=-1, help="rps_l2 feature layer (-1)")
    _add(methods, "epochs-rpsl2", type=int, default=100, help="rps_l2 surrogate epochs (100)")
    _add(methods, "tracin-start-layer", type=optional_layer_spec, default=None,
         help="tracin watched layer (default: the last weighted layer before the output)")
    _add(methods, "boundary-iter", type=int, default=100, help="boundary methods: DeepFool steps (100)")
    _add(methods, "subspace-dim", type=int, default=200, help="arnoldi Krylov dimension (200)")
    _add(methods, "k-largest-eig-vals", type=int, default=100, help="arnoldi eigenpairs kept (100)")
    _add_bool(methods, "force-hermitian", False, "arnoldi: symmetric eigensolver (default false)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line and fill the dataset-dependent defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = (args.methods or []) + (args.method_name or [])
    if not names:
        parser.error("give the methods to run with --methods (or --method-name)")
    args.methods = list(dict.fromkeys(names))
    if args.nbr_of_evaluation < 1:
        parser.error("--nbr-of-evaluation must be >= 1")
    if args.use_tensorboard:
        try:
            require_tensorboard()
        except ImportError as error:
            parser.error(str(error))
    return args


def make_factory(method: str, args: argparse.Namespace) -> Any:
    """The calculator factory of a method with the command line's settings.

    First order and RPS-LJE take their solver (``--ihvp-mode``, any registered name) through the solver registry
    (:meth:`~deel.influenciae.benchmark.influence_factory.FirstOrderFactory.solver_config`).
    """
    # pylint: disable=import-outside-toplevel
    from . import influence_factory as factories
    solver = {"ihvp_mode": args.ihvp_mode, "dataset_hessian_size": args.dataset_hessian_size,
              "n_opt_iters": args.n_opt_iters, "feature_extractor": args.feature_extractor,
              "regularization": args.regularization}
    builders = {
        "first_order": lambda: factories.FirstOrderFactory(start_layer=args.start_layer, **solver),
        "tracin": lambda: factories.TracInFactory(start_layer=args.tracin_start_layer),
        "rps_lje": lambda: factories.RPSLJEFactory(**solver),
        "rps_l2": lambda: factories.RPSL2Factory(lambda_regularization=args.lambda_regularization,
                                                 scaling_factor=args.scaling_factor, layer_index=args.layer_index,
                                                 epochs=args.epochs_rpsl2),
        "boundary_weights": lambda: factories.WeightsBoundaryCalculatorFactory(step_nbr=args.boundary_iter),
        "boundary_sample": lambda: factories.SampleBoundaryCalculatorFactory(step_nbr=args.boundary_iter),
        "arnoldi": lambda: factories.ArnoldiCalculatorFactory(subspace_dim=args.subspace_dim,
                                                              force_hermitian=args.force_hermitian,
                                                              k_largest_eig_vals=args.k_largest_eig_vals,
                                                              start_layer=args.start_layer,
                                                              dataset_hessian_size=args.dataset_hessian_size,
                                                              regularization=args.regularization),
        "loss_ranking": factories.LossRankingFactory,
    }
    if method not in builders:
        raise ValueError(f"unknown method {method!r}")
    return builders[method]()


def _use_bias(method: str, args: argparse.Namespace) -> bool:
    if args.use_bias is not None:
        return bool(args.use_bias)
    return args.dataset == "cifar10" and method not in RPS_METHODS


def make_evaluator(args: argparse.Namespace, use_bias: bool) -> Any:
    """The evaluator of the chosen dataset."""
    # pylint: disable=import-outside-toplevel
    take = args.take_batch if args.take_batch and args.take_batch > 0 else None
    if args.dataset == "digits":
        from .digits_benchmark import DigitsMislabelingDetectorEvaluator
        return DigitsMislabelingDetectorEvaluator(
            epochs=args.epochs, model_type=args.model_type, mislabeling_ratio=args.mislabeling_ratio,
            use_regu=args.use_regu, use_bias=use_bias, train_batch_size=args.train_batch_size,
            test_batch_size=args.test_batch_size, influence_batch_size=args.influence_batch_size,
            epochs_to_save=args.epochs_to_save, take_batch=take, verbose_training=args.verbose_training,
            use_tensorboard=args.use_tensorboard, hidden_units=args.hidden_units, learning_rate=args.learning_rate,
            split_seed=args.seed)
    from .cifar10_benchmark import Cifar10MislabelingDetectorEvaluator
    epochs_to_save = args.epochs_to_save if args.epochs_to_save is not None else [args.epochs - 1]
    return Cifar10MislabelingDetectorEvaluator(
        epochs=args.epochs, model_type=args.model_type, mislabeling_ratio=args.mislabeling_ratio,
        use_regu=args.use_regu, use_bias=use_bias, force_overfit=args.force_overfit,
        train_batch_size=args.train_batch_size, test_batch_size=args.test_batch_size,
        influence_batch_size=args.influence_batch_size, epochs_to_save=epochs_to_save, take_batch=take,
        verbose_training=args.verbose_training, use_tensorboard=args.use_tensorboard, data_path=args.data_path,
        allow_download=args.allow_download)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"{'method':18s} {'detection area':>20s} {'train s':>9s} {'influence s':>12s} {'total s':>9s}"]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['method']:18s} {'failed: ' + row['error'][:60]}")
            continue
        area = f"{row['area_mean']:.4f} ± {row['area_std']:.4f}"
        lines.append(f"{row['method']:18s} {area:>20s} {row['train_seconds']:9.1f} {row['influence_seconds']:12.1f} "
                     f"{row['seconds']:9.1f}")
    return "\n".join(lines)


def _row(method: str, entry: Any, timings: Dict[str, List[float]]) -> Dict[str, Any]:
    curves = np.asarray(entry[0], dtype=np.float64)
    areas = curves.mean(axis=1)
    train, influence = np.asarray(timings["train_seconds"]), np.asarray(timings["influence_seconds"])
    return {"method": method, "area_mean": float(areas.mean()), "area_std": float(areas.std()),
            "areas": [float(area) for area in areas], "nbr_of_evaluation": int(curves.shape[0]),
            "train_seconds": float(train.mean()), "influence_seconds": float(influence.mean()),
            "seconds": float(train.mean() + influence.mean()), "error": None}


def save_results(rows: List[Dict[str, Any]], result: Dict[str, Any], args: argparse.Namespace) -> Dict[str, str]:
    """Write ``results.json``, ``results.csv`` and ``curves.png`` under ``args.path_to_save``; return their paths."""
    from ..plots.benchmark import BenchmarkDisplay  # pylint: disable=import-outside-toplevel
    os.makedirs(args.path_to_save, exist_ok=True)
    paths = {name: os.path.join(args.path_to_save, name) for name in ("results.json", "results.csv", "curves.png")}
    settings = dict(vars(args))
    with open(paths["results.json"], "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "results": rows}, handle, indent=1, default=str)
    columns = ["method", "area_mean", "area_std", "nbr_of_evaluation", "train_seconds", "influence_seconds",
               "seconds", "areas", "error"]
    with open(paths["results.csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "areas": " ".join(f"{area:.6f}" for area in row.get("areas", []))})
    if result:
        title = (f"{args.dataset}: {args.mislabeling_ratio:g} mislabeled, {args.epochs} epochs, "
                 f"{args.nbr_of_evaluation} evaluation(s)")
        BenchmarkDisplay.plot_bench(result, path_to_save=paths["curves.png"], title=title)
    else:
        paths.pop("curves.png")
    return paths


def run_benchmark(args: argparse.Namespace) -> int:
    """Run every method of ``args.methods``; return the exit status (1 if a method failed)."""
    verbose = not args.quiet
    evaluators: Dict[bool, Any] = {}
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {}
    for position, method in enumerate(args.methods):
        if verbose:
            print(f"== {method} ({position + 1}/{len(args.methods)}) ==", flush=True)
        use_bias = _use_bias(method, args)
        if use_bias not in evaluators:
            evaluators[use_bias] = make_evaluator(args, use_bias)
        evaluator = evaluators[use_bias]
        start = time.perf_counter()
        try:
            entry = evaluator.evaluate(make_factory(method, args), args.nbr_of_evaluation, seed=args.seed,
                                       verbose=verbose, path_to_save=args.path_to_save,
                                       use_tensorboard=args.use_tensorboard, method_name=method)
        except Exception as error:  # pylint: disable=broad-exception-caught
            # One failing method must not lose the others' results.
            traceback.print_exc()
            rows.append({"method": method, "error": f"{type(error).__name__}: {error}",
                         "seconds": time.perf_counter() - start})
            continue
        result[method] = entry
        rows.append(_row(method, entry, evaluator.timings[method]))
    print(format_table(rows), flush=True)
    paths = save_results(rows, result, args)
    if verbose:
        print("saved: " + ", ".join(paths.values()), flush=True)
    return 1 if any(row.get("error") for row in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``influenciae-benchmark`` and ``python -m deel.influenciae.benchmark``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    try:
        return run_benchmark(args)
    except (FileNotFoundError, RuntimeError) as error:
        if args.dataset != "cifar10":
            raise
        print(f"influenciae-benchmark: {error}", file=sys.stderr)
        return 2
