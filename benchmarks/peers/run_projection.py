"""Peer worker of the projection benchmarks: traker's ``TRAKer`` and Captum's ``TracInCPFastRandProj``.

Runs in ``benchmarks/.venv-peers`` (PyTorch 2.13 CPU, traker 0.3.2, Captum 0.9; no TensorFlow). It reads the problem
file of ``peers/run_fidelity.py`` (written by ``bench_fidelity.write_peer_problem``: data, integer labels, the Keras
weights of every checkpoint, ``model_kind``, ``hidden_units``, ``logits_test``, ``learning_rates``), rebuilds the model
as its torch twin (:mod:`fidelity_twins`, checked against Keras' ``logits_test``), in float32, and writes the (T, N)
score matrices (test samples as rows) of:

* ``traker_final_d<d>``: traker's ``TRAKer`` on the final checkpoint, ``device="cpu"`` (hence its ``BasicProjector``,
  Gaussian, seed 0, generated in blocks of 100 columns), ``use_half_precision=False``, task
  ``"image_classification"`` (the margin ``log p_y / (1 - p_y)`` as model output, ``1 - p_y`` as out-to-loss weight);
* ``traker_ensemble_d<d>``: the same over all checkpoints (model ids 0..C-1: traker draws another projection for each
  model id, scales each model's ``(ΦᵀΦ + λI)⁻¹`` by the mean of its absolute entries, averages the per-model scores
  and multiplies them by the mean over models of ``1 - p_y``);
* ``captum_fastrandproj_d<d>``: Captum's ``TracInCPFastRandProj`` over all checkpoints with ``projection_dim=d``: the
  gradient of the **last Linear layer only**, as the outer product of that layer's input and output gradient, each
  side projected to ``min(√d, its size)`` values when ``in · out > d`` (Captum's rule; below, no projection: exact
  last-layer TracIn), ``CrossEntropyLoss(reduction="sum")``, learning rates from ``checkpoints_load_func``;
* ``captum_tracincp_all`` (unless ``--no-captum-exact``): Captum's exact ``TracInCP`` over all checkpoints and every
  layer (``run_fidelity.run_tracin``), the reference of the projected TracIns.

traker's damping and scale
--------------------------
traker normalises the projected gradients by ``√P`` (P parameters) and its Gaussian projection has unit entries, so
its features are ``φ_t = Rᵀ g / √P`` (``E[φ_t·φ_t'] = (d/P) g·g'``), and it adds ``lambda_reg`` to ``ΦᵀΦ`` (a sum over
the N training samples). The library's TRAK uses ``φ = Rᵀ g / √d`` (``E[φ·φ'] = g·g'``) and ``ΦᵀΦ / N + λI``. Both
kernels agree (in distribution: the projections differ) when ``lambda_reg = λ · d · N / P``: ``--dampings`` are given
on the library's scale and converted so (the factor is saved as ``lambda_scale__<strategy>``). traker's own default,
``lambda_reg = 0``, is stored under the suffix ``own``. Its scores are its own: no 1/N, an arbitrary positive factor
per model; the sign is ours (positive: the training sample is a proponent).

A damping other than the first reuses the featurised gradients (train and test): the worker sets the score computer's
``lambda_reg`` and clears the models' ``is_finalized`` flags, then calls ``finalize_features`` and ``finalize_scores``
again (traker has no re-damping entry point; this is what a second ``TRAKer`` on the same ``save_dir`` would compute).

Output (``np.savez``)
---------------------
``scores__<strategy>__<suffix>`` (T, N) float64 and ``seconds__<strategy>__<suffix>`` (wall seconds of the
featurisation of the training and test samples plus finalisation and scores at that damping) for the traker
strategies, ``<suffix>`` ``own`` or ``f"{λ:.0e}"``; ``scores__<strategy>`` / ``seconds__<strategy>`` for Captum's;
``fit_seconds__<strategy>`` (traker: the training set's featurisation alone; Captum: building the calculator, i.e. the
training side), ``label__<strategy>`` (a row label),
``first_seconds__...`` (the first round, when ``--repeats`` > 0: ``seconds__`` are then medians of the later rounds)
and ``rss_mib``.

Usage::

    benchmarks/.venv-peers/bin/python benchmarks/peers/run_projection.py --problem P.npz --output OUT.npz \\
        [--proj-dims 2048] [--captum-proj-dims 2048] [--dampings 1e-3,1e-2] [--threads 2] [--repeats 0]
"""
import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # traker's progress bars (read when tqdm is imported)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position
import fidelity_twins  # noqa: E402  pylint: disable=wrong-import-position

import torch  # noqa: E402  pylint: disable=import-error,wrong-import-position,wrong-import-order
from torch import nn  # noqa: E402  pylint: disable=import-error,C0413,C0411
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402  pylint: disable=import-error,C0413,C0411
from captum.influence import TracInCPFastRandProj  # noqa: E402  pylint: disable=import-error,C0413,C0411
from captum.influence._utils.nearest_neighbors import NearestNeighbors  # noqa: E402  pylint: disable=E0401,C0413,C0411
from trak import TRAKer  # noqa: E402  pylint: disable=import-error,C0413,C0411

OWN = "own"
Data = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# strategy -> (scores by suffix, seconds by suffix); Captum's strategies use the suffix "".
Results = Dict[str, Tuple[Dict[str, np.ndarray], Dict[str, float]]]


def suffix_of(damping: float) -> str:
    """Name suffix of a damping on the library's scale (``1e-03``)."""
    return f"{damping:.0e}"


def parse_args() -> argparse.Namespace:
    """Command line of the worker."""
    parser = argparse.ArgumentParser(description="traker's TRAK and Captum's TracInCPFastRandProj score matrices")
    parser.add_argument("--problem", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--proj-dims", default="2048", help="comma-separated traker projection dims (default 2048)")
    parser.add_argument("--captum-proj-dims", default="2048",
                        help="comma-separated TracInCPFastRandProj projection_dim values (default 2048)")
    parser.add_argument("--dampings", default="",
                        help="comma-separated λ on the library's scale (ΦᵀΦ/N + λI), besides traker's own λ = 0")
    parser.add_argument("--no-traker", action="store_true")
    parser.add_argument("--no-ensemble", action="store_true", help="traker: the final checkpoint only")
    parser.add_argument("--no-captum", action="store_true", help="skip Captum (fast and exact)")
    parser.add_argument("--no-captum-exact", action="store_true", help="skip Captum's exact TracInCP")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds after the first (default 0)")
    args = parser.parse_args()
    args.dims = [int(value) for value in args.proj_dims.split(",") if value.strip()]
    args.captum_dims = [int(value) for value in args.captum_proj_dims.split(",") if value.strip()]
    args.damping_values = [float(value) for value in args.dampings.split(",") if value.strip()]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


# -------- traker ----------------------------------------------------------------------------
def _refinalize(traker: TRAKer, model_ids: Sequence[int], lambda_reg: float) -> None:
    """Finalise the features of ``model_ids`` (again) with ``lambda_reg``: ``Φ (ΦᵀΦ + λI)⁻¹`` per model."""
    traker.score_computer.lambda_reg = lambda_reg
    if not hasattr(traker.projector, "proj_matrix"):
        # finalize_features calls BasicProjector.free_memory, which deletes the block it holds and fails when called
        # again (traker 0.3.2); the projector regenerates its blocks when it next projects, so a placeholder will do.
        traker.projector.proj_matrix = torch.empty(0)
    for model_id in model_ids:
        traker.saver.model_ids[model_id]["is_finalized"] = 0
    traker.finalize_features(model_ids=list(model_ids))


def run_traker(build: Callable[[List[np.ndarray]], nn.Module], checkpoints: List[List[np.ndarray]], data: Data,
               dim: int, dampings: Sequence[float], ensemble: bool, batch_size: int, folder: Path) -> Results:
    """traker's scores on the final checkpoint and, with ``ensemble``, on all of them, at its own λ = 0 and at every
    damping of ``dampings`` (library scale)."""
    x_train, y_train, x_test, y_test = data
    n_train, n_test = int(x_train.shape[0]), int(x_test.shape[0])
    model = build(checkpoints[-1])
    n_params = sum(parameter.numel() for parameter in model.parameters())
    scale = dim * n_train / n_params  # traker's lambda_reg per unit of the library's λ (see the module docstring)
    # a new save_dir (load_from_save_dir=False would skip creating its experiments.json: scoring then fails)
    traker = TRAKer(model=model, task="image_classification", train_set_size=n_train, save_dir=str(folder),
                    device="cpu", proj_dim=dim, use_half_precision=False,
                    logging_level=logging.ERROR, projector_seed=0)
    states = [build(weights).state_dict() for weights in checkpoints]
    final_id = len(checkpoints) - 1
    featurize: Dict[int, float] = {}
    for model_id, state in enumerate(states):
        if not ensemble and model_id != final_id:
            continue
        start = time.perf_counter()
        traker.load_checkpoint(state, model_id=model_id)
        for begin in range(0, n_train, batch_size):
            batch = (x_train[begin:begin + batch_size], y_train[begin:begin + batch_size])
            traker.featurize(batch, num_samples=int(batch[0].shape[0]))
        featurize[model_id] = time.perf_counter() - start
    train_featurize = dict(featurize)  # the training set's alone: the "fit"
    model_ids = sorted(featurize)
    groups = {f"traker_final_d{dim}": [final_id]}
    if ensemble:
        groups[f"traker_ensemble_d{dim}"] = model_ids
    results: Results = {name: ({}, {}) for name in groups}
    finalize: Dict[int, float] = {}
    for position, (suffix, lambda_reg) in enumerate([(OWN, 0.0)] + [(suffix_of(d), d * scale) for d in dampings]):
        for model_id in model_ids:  # per model, to charge each strategy its own models only
            start = time.perf_counter()
            _refinalize(traker, [model_id], lambda_reg)
            finalize[model_id] = time.perf_counter() - start
        if position == 0:  # the test side's projected gradients do not depend on λ: once, after the first finalize
            for model_id in model_ids:
                start = time.perf_counter()
                traker.start_scoring_checkpoint(exp_name="test", checkpoint=states[model_id], model_id=model_id,
                                                num_targets=n_test)
                traker.score(batch=(x_test, y_test), num_samples=n_test)
                featurize[model_id] += time.perf_counter() - start
        for name, ids in groups.items():
            start = time.perf_counter()
            scores = np.array(traker.finalize_scores(exp_name="test", model_ids=ids), dtype=np.float64).T
            seconds = time.perf_counter() - start + sum(featurize[i] + finalize[i] for i in ids)
            results[name][0][suffix], results[name][1][suffix] = scores, seconds
            results[name][1]["fit"] = sum(train_featurize[i] for i in ids)
    for name in results:
        results[name][1]["lambda_scale"] = scale
    return results


# -------- Captum ----------------------------------------------------------------------------
class DotProductNeighbors(NearestNeighbors):
    """Exact largest-dot-product search (Captum's default, ``AnnoyNearestNeighbors``, needs the ``annoy`` package;
    the score matrix, ``influence(k=None)``, never uses it)."""

    def __init__(self) -> None:
        self.data = torch.zeros(0)

    def setup(self, data: torch.Tensor) -> None:
        """Keep the training vectors."""
        self.data = data.reshape(data.shape[0], -1)

    def get_nearest_neighbors(self, query: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(indices, dot products)`` of the k stored vectors with the largest dot product with each query."""
        values, indices = torch.topk(query.reshape(query.shape[0], -1) @ self.data.T, k, dim=1)
        return indices, values


def run_captum_fast(build: Callable[[List[np.ndarray]], nn.Module], checkpoints: List[List[np.ndarray]],
                    rates: Sequence[float], data: Data, dims: Sequence[int], batch_size: int,
                    folder: Path) -> Results:
    """``TracInCPFastRandProj`` over all checkpoints, one per projection dim."""
    x_train, y_train, x_test, y_test = data
    paths, load_checkpoint = fidelity_twins.checkpoint_files(build, checkpoints, rates, folder)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size)
    results: Results = {}
    for dim in dims:
        model = build(checkpoints[-1])
        last_linear = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
        start = time.perf_counter()
        tracin = TracInCPFastRandProj(model, last_linear, loader, paths, checkpoints_load_func=load_checkpoint,
                                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                                      nearest_neighbors=DotProductNeighbors(), projection_dim=dim, seed=0)
        fit = time.perf_counter() - start
        scores = tracin.influence((x_test, y_test), k=None).detach().double().numpy()
        seconds = time.perf_counter() - start
        projected = tracin.projection_quantities is not None
        results[f"captum_fastrandproj_d{dim}"] = ({"": scores}, {"": seconds, "fit": fit,
                                                                 "projected": float(projected)})
    return results


def run_captum_exact(build: Callable[[List[np.ndarray]], nn.Module], checkpoints: List[List[np.ndarray]],
                     rates: Sequence[float], data: Data, batch_size: int, folder: Path) -> Results:
    """Captum's exact ``TracInCP`` over all checkpoints and layers (``run_fidelity.run_tracin``; it imports
    kronfluence, also in the peer venv)."""
    import run_fidelity  # pylint: disable=import-outside-toplevel,import-error
    scores, seconds = run_fidelity.run_tracin(build, checkpoints, rates, data, batch_size, folder)["captum_tracin_all"]
    return {"captum_tracincp_all": ({"": scores}, {"": seconds})}


# -------- Main ------------------------------------------------------------------------------
def label(strategy: str, n_checkpoints: int, last_layer_size: int, projected: bool) -> str:
    """Row label of a strategy (``last_layer_size``: the last Linear layer's size, what Captum's fast TracIn sees)."""
    if strategy.startswith("traker_"):
        which = "final checkpoint" if "_final_" in strategy else f"{n_checkpoints} checkpoints"
        return f"traker TRAK, {which}, d = {strategy.rsplit('_d', 1)[1]}"
    if strategy.startswith("captum_fastrandproj_d"):
        how = f"last layer, d = {strategy.rsplit('_d', 1)[1]}"
        how += "" if projected else f" ≥ its {last_layer_size} weights: not projected"
        return f"Captum TracInCPFastRandProj ({how}), {n_checkpoints} checkpoints"
    return f"Captum TracInCP (exact, every layer), {n_checkpoints} checkpoints"


def one_round(args: argparse.Namespace, build: Callable[[List[np.ndarray]], nn.Module],
              checkpoints: List[List[np.ndarray]], rates: Sequence[float], data: Data) -> Results:
    """Every strategy once."""
    results: Results = {}
    with tempfile.TemporaryDirectory() as folder:
        if not args.no_traker:
            for dim in args.dims:
                results.update(run_traker(build, checkpoints, data, dim, args.damping_values, not args.no_ensemble,
                                          args.batch_size, Path(folder) / f"traker_{dim}"))
        if not args.no_captum:
            results.update(run_captum_fast(build, checkpoints, rates, data, args.captum_dims, args.batch_size,
                                           Path(folder)))
            if not args.no_captum_exact:
                results.update(run_captum_exact(build, checkpoints, rates, data, args.batch_size, Path(folder)))
    return results


def main() -> int:
    """Check the twin, run every strategy ``--repeats + 1`` times, save the last scores and the timings."""
    args = parse_args()
    warnings.filterwarnings("ignore")
    arrays, checkpoints = common.load_problem(args.problem)
    build = fidelity_twins.twin_builder(arrays, torch.float32)

    try:
        difference = fidelity_twins.check_twin(build(checkpoints[-1]), arrays["x_test"], arrays["logits_test"])
    except (KeyError, ValueError) as error:
        raise SystemExit(f"aborting: the torch twin cannot be checked against Keras: {error}") from error
    data = (torch.from_numpy(arrays["x_train"]).float(), torch.from_numpy(arrays["y_train"]).long(),
            torch.from_numpy(arrays["x_test"]).float(), torch.from_numpy(arrays["y_test"]).long())
    rates = [float(rate) for rate in arrays["learning_rates"]]
    n_params = sum(parameter.numel() for parameter in build(checkpoints[-1]).parameters())
    print(f"{arrays['model_kind']} P={n_params} N={data[0].shape[0]} T={data[2].shape[0]} "
          f"checkpoints={len(checkpoints)} float32, "
          f"{args.threads} threads; twin max |logit diff| = {difference:.2e}", flush=True)

    rounds = [one_round(args, build, checkpoints, rates, data) for _ in range(args.repeats + 1)]
    out: Dict[str, np.ndarray] = {}
    last_layer = [module for module in build(checkpoints[-1]).modules() if isinstance(module, nn.Linear)][-1]
    for strategy, (scores, seconds) in rounds[-1].items():
        projected = bool(seconds.get("projected", 1.0))
        out[f"label__{strategy}"] = np.asarray(label(strategy, len(checkpoints), last_layer.weight.numel(), projected))
        if "fit" in seconds:
            out[f"fit_seconds__{strategy}"] = np.float64(seconds["fit"])
        if "lambda_scale" in seconds:
            out[f"lambda_scale__{strategy}"] = np.float64(seconds["lambda_scale"])
        shown = []
        for suffix, matrix in scores.items():
            name = f"{strategy}__{suffix}" if suffix else strategy
            timings = [result[strategy][1][suffix] for result in rounds]
            out[f"scores__{name}"] = matrix
            out[f"seconds__{name}"] = np.float64(statistics.median(timings[1:]) if len(timings) > 1 else timings[0])
            out[f"first_seconds__{name}"] = np.float64(timings[0])
            shown.append(f"{suffix or 'scores'} {float(out[f'seconds__{name}']):.2f}s")
        print(f"  {strategy:28s} " + ", ".join(shown), flush=True)
    common.save_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
