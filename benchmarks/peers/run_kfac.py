"""Peer worker of the K-FAC / EK-FAC benchmark (``benchmarks/bench_kfac.py``): kronfluence's pairwise scores, timed.

Runs in ``benchmarks/.venv-peers`` (PyTorch 2.13 CPU, kronfluence 1.0.1; no TensorFlow). It reads the problem file
of the fidelity benchmark (``bench_fidelity.write_peer_problem``: data, Keras weights, Keras' test logits), rebuilds
the torch twin (:mod:`fidelity_twins`, checked against Keras' logits) and, for every kronfluence strategy asked for,
fits the factors once and computes the (T, N) pairwise scores at kronfluence's heuristic damping and at every
``--dampings`` value. The task, the factor and score arguments, the strategies and the damping names are those of
:mod:`run_fidelity` (imported; its module docstring documents kronfluence's conventions and scale).

What this worker adds to :mod:`run_fidelity`:

* timing passes: ``--warmup`` runs the first strategy once, untimed, before the timed pass (torch's and
  kronfluence's first-use costs are left out, as ``bench_kfac.py`` leaves out its own process warm-up);
* ``--fisher-repeats K``: the factors (and EK-FAC's eigenvalue correction) are fitted on the training set repeated K
  times, so that the true Fisher averages K label draws per sample (the scores still use each training sample
  once); the seconds are then not comparable and the driver does not time such runs;
* no gradient-dot-product reference and no Captum.

Usage::

    benchmarks/.venv-peers/bin/python benchmarks/peers/run_kfac.py --problem P.npz --output OUT.npz \\
        [--strategies kfac,ekfac] [--dampings 1e-3] [--dtype float32] [--threads 2] [--seed 0] [--warmup]

Output (``.npz``): ``scores__<method>__<damping>`` (float64 (T, N)), ``fit_seconds__<method>`` (the factor fit) and
``score_seconds__<method>__<damping>`` (the pairwise scores at that damping alone), ``<damping>`` being
``heuristic`` or ``f"{λ:.0e}"``; ``rss_mib``.
"""
import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
import common  # noqa: E402
import fidelity_twins  # noqa: E402
from run_fidelity import (DTYPES, STRATEGIES, ClassificationTask, kronfluence_arguments,  # noqa: E402
                          pairwise_at_dampings)

import torch  # noqa: E402  pylint: disable=import-error,wrong-import-order
from torch.utils.data import ConcatDataset, TensorDataset  # noqa: E402  pylint: disable=import-error,C0411
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402  pylint: disable=import-error,C0411
# pylint: enable=wrong-import-position


def parse_args() -> argparse.Namespace:
    """Command line of the worker."""
    parser = argparse.ArgumentParser(description="kronfluence K-FAC / EK-FAC scores and seconds for bench_kfac.py")
    parser.add_argument("--problem", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--dampings", default="1e-3",
                        help="comma-separated λ of (F + λI), besides kronfluence's heuristic (default %(default)s)")
    parser.add_argument("--strategies", default="kfac,ekfac,kfac_empirical,ekfac_empirical",
                        help="comma-separated methods of run_fidelity.STRATEGIES (default %(default)s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="float32: kronfluence's defaults; float64: every dtype argument (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (factors and scores)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (true-Fisher label sampling)")
    parser.add_argument("--warmup", action="store_true", help="run the first strategy once, untimed, first")
    parser.add_argument("--dump-factors", type=Path, default=None,
                        help="save every strategy's fitted factors (kronfluence's names) to this .npz")
    parser.add_argument("--fisher-repeats", type=int, default=1,
                        help="fit the factors on the training set repeated this many times (default %(default)s)")
    args = parser.parse_args()
    args.dumped = {}
    args.damping_values = [float(value) for value in args.dampings.split(",") if value.strip()]
    args.methods = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose among {list(STRATEGIES)}")
    if args.fisher_repeats < 1:
        parser.error("--fisher-repeats must be >= 1")
    torch.set_num_threads(args.threads)
    return args


def fit_and_score(analyzer: Analyzer, method: str, datasets: Tuple[torch.utils.data.Dataset, TensorDataset,
                                                                     TensorDataset],
                  args: argparse.Namespace) -> Tuple[float, Dict[str, Tuple[np.ndarray, float]]]:
    """One factor fit on ``datasets[0]``, then the pairwise scores of ``datasets[2]`` (queries) against
    ``datasets[1]`` (training samples) at the heuristic damping and at every ``--dampings`` value.

    Returns
    -------
    tuple
        The fit's seconds, and ``{damping suffix: ((T, N) float64 scores, seconds of these scores alone)}``.
    """
    strategy, empirical = STRATEGIES[method]
    fit_set, train_set, test_set = datasets
    dtype = DTYPES[args.dtype]
    factor_args, _ = kronfluence_arguments(strategy, empirical, None, dtype)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    analyzer.fit_all_factors(factors_name=method, dataset=fit_set, per_device_batch_size=args.batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    fit_seconds = time.perf_counter() - start
    if args.dump_factors is not None:
        factors = analyzer.load_all_factors(factors_name=method)
        args.dumped.update({f"{method}__{kind}__{module}": tensor.double().numpy()
                            for kind, per_module in factors.items() for module, tensor in per_module.items()
                            if tensor is not None})
    dampings: List[Optional[float]] = [None, *args.damping_values]
    results = pairwise_at_dampings(analyzer, method, dampings, (train_set, test_set), args.batch_size, dtype)
    return fit_seconds, results


def main() -> int:
    """Check the twin, (warm up,) fit and score every strategy, save scores and seconds."""
    args = parse_args()
    warnings.filterwarnings("ignore")
    arrays, checkpoints = common.load_problem(args.problem)
    dtype = DTYPES[args.dtype]
    model = fidelity_twins.twin_builder(arrays, dtype)(checkpoints[-1])
    try:
        difference = fidelity_twins.check_twin(model, arrays["x_test"], arrays["logits_test"])
    except ValueError as error:
        raise SystemExit(f"aborting: {error}") from error
    data = (torch.from_numpy(arrays["x_train"]).to(dtype), torch.from_numpy(arrays["y_train"]).long(),
            torch.from_numpy(arrays["x_test"]).to(dtype), torch.from_numpy(arrays["y_test"]).long())
    train_set, test_set = TensorDataset(data[0], data[1]), TensorDataset(data[2], data[3])
    fit_set = train_set if args.fisher_repeats == 1 else ConcatDataset([train_set] * args.fisher_repeats)
    print(f"{arrays['model_kind']} N={len(train_set)} T={len(test_set)} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} "
          f"seed={args.seed} fisher repeats={args.fisher_repeats}; twin max |logit diff| = {difference:.2e}",
          flush=True)
    out: Dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder:
        task = ClassificationTask()
        analyzer = Analyzer(analysis_name="kfac", model=prepare_model(model, task), task=task, cpu=True,
                            log_level=logging.WARNING, disable_tqdm=True, output_dir=str(Path(folder) / "kronfluence"))
        if args.warmup:
            start = time.perf_counter()
            fit_and_score(analyzer, args.methods[0], (fit_set, train_set, test_set), args)
            print(f"  warm-up ({args.methods[0]}, untimed): {time.perf_counter() - start:.2f}s", flush=True)
        for method in args.methods:
            fit_seconds, results = fit_and_score(analyzer, method, (fit_set, train_set, test_set), args)
            out[f"fit_seconds__{method}"] = np.float64(fit_seconds)
            for suffix, (scores, seconds) in results.items():
                out[f"scores__{method}__{suffix}"] = scores
                out[f"score_seconds__{method}__{suffix}"] = np.float64(seconds)
            print(f"  kronfluence {method:16s} fit {fit_seconds:6.2f}s, scores "
                  + " ".join(f"{suffix} {seconds:.2f}s" for suffix, (_, seconds) in results.items()), flush=True)
    out["rss_mib"] = np.float64(common.peak_rss_mib())
    if args.dump_factors is not None:
        np.savez(args.dump_factors, **args.dumped)
    np.savez(args.output, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
