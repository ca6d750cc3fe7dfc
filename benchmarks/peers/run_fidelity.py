"""Peer worker of the fidelity (linear datamodeling score) benchmark: kronfluence and Captum TracInCP.

Runs in ``benchmarks/.venv-peers`` (PyTorch 2.13 CPU, Captum, kronfluence 1.0.1; no TensorFlow). It reads the
problem file written by ``benchmarks/bench_fidelity.py`` (layout: :func:`common.load_problem`, plus
``model_kind``, ``hidden_units`` and ``logits_test``), rebuilds the Keras model as a torch twin
(:mod:`fidelity_twins`, checked against Keras' ``logits_test``) and writes, for every method, the (T, N) matrix of
pairwise scores of the test samples (rows) against the training samples (columns).

Usage::

    benchmarks/.venv-peers/bin/python benchmarks/peers/run_fidelity.py --problem P.npz --output OUT.npz \\
        [--threads 2] [--dampings 1e-8,1e-6,1e-4,1e-3,1e-2,1e-1]

Sign and scale
--------------
Our convention: ``score(t, z) = g(t)ᵀ (H + λI)⁻¹ g(z)``, ``g`` the per-sample cross-entropy gradient, ``H`` the
curvature of the **mean** training loss; positive = proponent (upweighting ``z`` lowers the loss of ``t``).

kronfluence 1.0.1 (read in its sources, paths relative to ``site-packages/kronfluence``):

* ``score/pairwise.py`` (``compute_pairwise_scores_with_loaders``): the query gradient is the backward pass of
  ``Task.compute_measurement`` (here the test cross-entropy summed over the batch, so each row is that sample's own
  gradient), preconditioned per layer by ``FactorConfig.precondition_gradient`` (``factor/config.py``) in
  ``module/tracker/precondition.py``;
* ``score/dot_product.py`` (``compute_dot_products_with_loader``): the training gradients are the backward pass of
  ``Task.compute_train_loss(sample=False)`` (summed cross-entropy with the true labels);
* ``module/linear.py`` / ``module/conv2d.py`` (``compute_pairwise_score``): ``einsum("qio,b...i,b...o->qb")``, a
  plain dot product summed over layers (``ALL_MODULE_NAME``): no minus sign and no 1/N factor;
* ``factor/eigen.py`` (``perform_eigendecomposition``) divides the activation and pseudo-gradient covariance sums
  by the number of rows processed, and ``Ekfac.prepare`` / ``Diagonal.prepare`` (``factor/config.py``) divide the
  Lambda matrix by the number of samples: the curvature is the **mean** per-sample Fisher, the same scale as our
  ``H``, so ``damping_factor`` is our λ. ``damping_factor=None`` is kronfluence's heuristic
  ``0.1 · mean(Λ)`` (``HEURISTIC_DAMPING_SCALE``, ``utils/constants.py``), computed **per layer**.

So kronfluence's scores are on our scale and sign: they are stored unchanged (factor +1). The worker checks it:
the ``identity`` strategy (``Identity.precondition_gradient`` returns the gradient; the damping is unused) must be
proportional, with a positive factor (expected: 1), to the gradient dot products computed here with
``torch.func`` (Pearson > 0.999 on every row, asserted).

The kronfluence preconditioners are block-diagonal over layers (every ``nn.Linear`` / ``nn.Conv2d`` is a block,
cross-layer curvature is ignored) and are Fishers, not the Hessian: ``kfac`` / ``ekfac`` use the true Fisher
(labels sampled from the model's softmax, one draw per sample and per pass: ``use_empirical_fisher=False``),
``*_empirical`` the empirical Fisher (true labels). For softmax cross-entropy the true Fisher's expectation is the
Gauss–Newton matrix. For ``nn.Conv2d`` kronfluence averages both Kronecker factors over (sample, output location)
rows and sums the per-sample gradient over locations, so its plain-KFAC conv block is ``A ⊗ G``, not KFC's
``|T| A ⊗ G`` (|T| output locations: 36 and 16 here): in ``kfac`` the conv blocks' curvature is |T| times
smaller than the dense blocks' (EKFAC refits the eigenvalues from per-sample gradients and is not affected).

Captum ``TracInCP``: ``Σ_k lr_k ∇ℓ_k(t)·∇ℓ_k(z)`` with ``lr_k`` what ``checkpoints_load_func`` returns (the
problem's ``learning_rates``), ``CrossEntropyLoss(reduction="sum")`` and ``sample_wise_grads_per_batch=True``
(Captum's hook-based per-sample gradients, which support ``nn.Conv2d`` with an integer padding), every layer:
our sign, no conversion. ``captum_tracin_final`` uses the last checkpoint only (still multiplied by its learning
rate), ``captum_tracin_all`` all of them.

Precision
---------
``--dtype float64`` (default): the twins, the inputs and every kronfluence dtype argument (covariances,
eigendecomposition, Lambda, per-sample gradients, preconditioning, scores) are float64, so that the smallest
dampings (1e-8) are not drowned in float32 rounding. ``--dtype float32`` keeps kronfluence's defaults (float32
everywhere except the float64 eigendecomposition).

Output
------
``scores__<method>__<damping>`` (float64, (T, N)) and ``seconds__<method>__<damping>`` (wall seconds of the factor
fit plus these scores) for ``<method>`` in ``identity, kfac, kfac_empirical, ekfac, ekfac_empirical`` and
``<damping>`` ``heuristic`` (``damping_factor=None``) or ``f"{λ:.0e}"`` (e.g. ``1e-03``); ``fit_seconds__<method>``
(the factor fit alone, shared by that method's dampings). ``identity`` ignores the damping: it is computed once and
stored under every damping name. ``scores__captum_tracin_final`` / ``scores__captum_tracin_all`` with their
``seconds__``; ``rss_mib`` (peak resident memory of the process).
"""
import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position
import fidelity_twins  # noqa: E402  pylint: disable=wrong-import-position

import torch  # noqa: E402  pylint: disable=import-error,wrong-import-position,wrong-import-order
import torch.nn.functional as F  # noqa: E402  pylint: disable=import-error,C0413,C0411
from torch import nn  # noqa: E402  pylint: disable=import-error,C0413,C0411
from torch.func import functional_call, grad, vmap  # noqa: E402  pylint: disable=import-error,C0413,C0411
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402  pylint: disable=import-error,C0413,C0411
from captum.influence import TracInCP  # noqa: E402  pylint: disable=import-error,C0413,C0411
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402  pylint: disable=import-error,C0413,C0411
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402  pylint: disable=E0401,C0413,C0411
from kronfluence.task import Task  # noqa: E402  pylint: disable=import-error,C0413,C0411

# method name -> (kronfluence strategy, use_empirical_fisher)
STRATEGIES: Dict[str, Tuple[str, bool]] = {"identity": ("identity", True), "kfac": ("kfac", False),
                                           "kfac_empirical": ("kfac", True), "ekfac": ("ekfac", False),
                                           "ekfac_empirical": ("ekfac", True)}
DEFAULT_DAMPINGS = "1e-8,1e-6,1e-4,1e-3,1e-2,1e-1"
HEURISTIC = "heuristic"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
IDENTITY_MIN_PEARSON = 0.999


class ClassificationTask(Task):
    """Softmax cross-entropy task: summed training loss (true or sampled labels), summed test loss as measurement."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        """Cross-entropy summed over the batch; with ``sample``, labels drawn from the model's softmax (true Fisher)."""
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                probabilities = torch.softmax(logits.detach(), dim=-1)
                labels = torch.multinomial(probabilities, num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """The test samples' cross-entropy, summed (each sample's gradient is its own loss gradient)."""
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def damping_suffix(damping: Optional[float]) -> str:
    """Name suffix of a damping: ``heuristic`` for ``None``, else ``f"{damping:.0e}"`` (``1e-03``)."""
    return HEURISTIC if damping is None else f"{damping:.0e}"


def parse_args() -> argparse.Namespace:
    """Command line of the worker."""
    parser = argparse.ArgumentParser(description="kronfluence and Captum TracInCP scores for the fidelity benchmark")
    parser.add_argument("--problem", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dampings", default=DEFAULT_DAMPINGS,
                        help="comma-separated λ of (F + λI), besides kronfluence's heuristic (default %(default)s)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated kronfluence methods (default %(default)s)")
    parser.add_argument("--no-captum", action="store_true", help="skip Captum's TracInCP")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="see the module docstring")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (factors, scores, TracIn)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (true-Fisher label sampling)")
    args = parser.parse_args()
    args.damping_values = [float(value) for value in args.dampings.split(",") if value.strip()]
    args.methods = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose among {list(STRATEGIES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


# -------- Reference: plain gradient dot products ------------------------------------------
def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` per-sample cross-entropy gradients (``torch.func``; torch parameter order, flattened)."""
    params = {name: parameter.detach() for name, parameter in model.named_parameters()}

    def loss(parameters: Dict[str, torch.Tensor], sample: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, parameters, (sample.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0), reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    return torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in params], dim=1)


def gradient_dot_products(model: nn.Module, data: Sequence[torch.Tensor], batch_size: int) -> np.ndarray:
    """``g_test · g_train`` (T, N), float64, training gradients computed by batches."""
    x_train, y_train, x_test, y_test = data
    test_grads = per_sample_gradients(model, x_test, y_test).double()
    blocks = [test_grads @ per_sample_gradients(model, x_train[start:start + batch_size],
                                                y_train[start:start + batch_size]).double().T
              for start in range(0, x_train.shape[0], batch_size)]
    return torch.cat(blocks, dim=1).numpy()


def row_agreement(scores: np.ndarray, reference: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row Pearson correlations and least-squares factors ``scores_row ≈ factor · reference_row``."""
    centred_s = scores - scores.mean(axis=1, keepdims=True)
    centred_r = reference - reference.mean(axis=1, keepdims=True)
    pearson = np.sum(centred_s * centred_r, axis=1) / np.sqrt(np.sum(centred_s ** 2, axis=1)
                                                              * np.sum(centred_r ** 2, axis=1))
    factors = np.sum(scores * reference, axis=1) / np.sum(reference * reference, axis=1)
    return pearson, factors


# -------- kronfluence ---------------------------------------------------------------------
def kronfluence_arguments(strategy: str, empirical: bool, damping: Optional[float],
                          dtype: torch.dtype) -> Tuple[FactorArguments, ScoreArguments]:
    """Factor and score arguments; with float64 every dtype argument is float64 (kronfluence's defaults otherwise)."""
    if dtype == torch.float64:
        factor_dtypes = {name: torch.float64 for name in ("activation_covariance_dtype", "gradient_covariance_dtype",
                                                          "eigendecomposition_dtype", "per_sample_gradient_dtype",
                                                          "lambda_dtype")}
        score_dtypes = {name: torch.float64 for name in ("per_sample_gradient_dtype", "precondition_dtype",
                                                         "score_dtype", "query_gradient_svd_dtype")}
    else:
        factor_dtypes, score_dtypes = {}, {}
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical, **factor_dtypes)
    score_args = ScoreArguments(damping_factor=damping, **score_dtypes)
    return factor_args, score_args


def pairwise_at_dampings(analyzer: Analyzer, method: str, dampings: Sequence[Optional[float]],
                         datasets: Tuple[Any, Any], batch_size: int,
                         dtype: torch.dtype) -> Dict[str, Tuple[np.ndarray, float]]:
    """kronfluence's (T, N) pairwise scores of ``datasets = (train, test)`` from the fitted factors of ``method`` at
    every damping (None: its heuristic): ``{damping suffix: (float64 scores, seconds of these scores alone)}``."""
    strategy, empirical = STRATEGIES[method]
    train_set, test_set = datasets
    results: Dict[str, Tuple[np.ndarray, float]] = {}
    for damping in dampings:
        _, score_args = kronfluence_arguments(strategy, empirical, damping, dtype)
        name = f"{method}__{damping_suffix(damping)}"
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name=name, factors_name=method, query_dataset=test_set,
                                         train_dataset=train_set, per_device_query_batch_size=len(test_set),
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name=name)["all_modules"]
        results[damping_suffix(damping)] = (scores.double().numpy(), time.perf_counter() - start)
    return results


def run_kronfluence(analyzer: Analyzer, method: str, datasets: Tuple[TensorDataset, TensorDataset],
                    args: argparse.Namespace) -> Tuple[float, Dict[str, Tuple[np.ndarray, float]]]:
    """One factor fit, then the pairwise scores for the heuristic damping and every ``--dampings`` value.

    Returns
    -------
    tuple
        The fit's seconds, and ``{damping suffix: ((T, N) float64 scores, seconds of these scores alone)}``.
    """
    strategy, empirical = STRATEGIES[method]
    train_set, test_set = datasets
    dtype = DTYPES[args.dtype]
    factor_args, _ = kronfluence_arguments(strategy, empirical, None, dtype)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    analyzer.fit_all_factors(factors_name=method, dataset=train_set, per_device_batch_size=args.batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    fit_seconds = time.perf_counter() - start

    dampings: List[Optional[float]] = [None] + ([] if strategy == "identity" else list(args.damping_values))
    results = pairwise_at_dampings(analyzer, method, dampings, (train_set, test_set), args.batch_size, dtype)
    if strategy == "identity":  # Identity.precondition_gradient ignores the damping: one computation serves all
        results.update({damping_suffix(damping): results[HEURISTIC] for damping in args.damping_values})
    return fit_seconds, results


# -------- Captum TracInCP -----------------------------------------------------------------
def run_tracin(build: Callable[[List[np.ndarray]], nn.Module], checkpoints: List[List[np.ndarray]],
               rates: Sequence[float], data: Sequence[torch.Tensor], batch_size: int,
               folder: Path) -> Dict[str, Tuple[np.ndarray, float]]:
    """``TracInCP`` over the last checkpoint and over all of them: ``{name: ((T, N) scores, seconds)}``."""
    x_train, y_train, x_test, y_test = data
    paths, load_checkpoint = fidelity_twins.checkpoint_files(build, checkpoints, rates, folder)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size)
    results = {}
    for name, selected in (("captum_tracin_final", paths[-1:]), ("captum_tracin_all", paths)):
        model = build(checkpoints[-1])
        start = time.perf_counter()
        tracin = TracInCP(model, loader, selected, checkpoints_load_func=load_checkpoint,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                          sample_wise_grads_per_batch=True)
        scores = tracin.influence((x_test, y_test)).detach().double().numpy()
        results[name] = (scores, time.perf_counter() - start)
    return results


# -------- Checks --------------------------------------------------------------------------
def check_identity(scores: np.ndarray, reference: np.ndarray) -> None:
    """Abort unless the ``identity`` scores are ``factor · g_test·g_train`` (Pearson > 0.999 per row, factor > 0)."""
    pearson, factors = row_agreement(scores, reference)
    print(f"  check identity vs g_test·g_train: Pearson per row min {pearson.min():.6f}, factor per row "
          f"[{factors.min():.6f}, {factors.max():.6f}]", flush=True)
    if not (pearson.min() > IDENTITY_MIN_PEARSON and factors.min() > 0):
        raise SystemExit(f"aborting: kronfluence's identity scores are not proportional to the gradient dot products "
                         f"(min Pearson {pearson.min():.6f}, factors [{factors.min()}, {factors.max()}])")


def print_sanity(out: Dict[str, np.ndarray], reference: np.ndarray, methods: Sequence[str],
                 dampings: Sequence[float], last_rate: float) -> None:
    """Print how the other methods' scores correlate with the plain gradient dot products (no assertion)."""
    if "scores__captum_tracin_final" in out:
        pearson, factors = row_agreement(out["scores__captum_tracin_final"], reference)
        print(f"  sanity captum_tracin_final vs g_test·g_train: Pearson per row min {pearson.min():.6f}, factor "
              f"median {np.median(factors):.6f} (last learning rate {last_rate:g})")
    suffixes = [HEURISTIC] + [damping_suffix(damping) for damping in dampings]
    for method in methods:
        if method == "identity":
            continue
        means = [np.mean(row_agreement(out[f"scores__{method}__{suffix}"], reference)[0]) for suffix in suffixes]
        correlations = ", ".join(f"{suffix} {value:.2f}" for suffix, value in zip(suffixes, means))
        print(f"  sanity {method} vs g_test·g_train, mean row Pearson: {correlations}")


# -------- Main ----------------------------------------------------------------------------
def main() -> int:
    """Check the twin, compute every method's scores, check ``identity`` against the gradient dot products, save."""
    args = parse_args()
    warnings.filterwarnings("ignore")
    arrays, checkpoints = common.load_problem(args.problem)
    dtype = DTYPES[args.dtype]
    build = fidelity_twins.twin_builder(arrays, dtype)

    if "logits_test" not in arrays:
        raise SystemExit(f"{args.problem} has no 'logits_test': the torch twin cannot be checked against Keras")
    try:
        difference = fidelity_twins.check_twin(build(checkpoints[-1]), arrays["x_test"], arrays["logits_test"])
    except ValueError as error:
        raise SystemExit(f"aborting: {error}") from error
    data = (torch.from_numpy(arrays["x_train"]).to(dtype), torch.from_numpy(arrays["y_train"]).long(),
            torch.from_numpy(arrays["x_test"]).to(dtype), torch.from_numpy(arrays["y_test"]).long())
    n_train, n_test = data[0].shape[0], data[2].shape[0]
    n_params = sum(parameter.numel() for parameter in build(checkpoints[-1]).parameters())
    print(f"{arrays['model_kind']} {arrays.get('hidden_units', '')} P={n_params} N={n_train} T={n_test} "
          f"checkpoints={len(checkpoints)} dtype={args.dtype}; twin max |logit diff| = {difference:.2e}", flush=True)

    start = time.perf_counter()
    reference = gradient_dot_products(build(checkpoints[-1]), data, args.batch_size)
    print(f"  gradient dot products (torch.func): {time.perf_counter() - start:.2f}s", flush=True)

    out: Dict[str, np.ndarray] = {}
    datasets = (TensorDataset(data[0], data[1]), TensorDataset(data[2], data[3]))
    with tempfile.TemporaryDirectory() as folder:
        if args.methods:
            task = ClassificationTask()
            model = prepare_model(build(checkpoints[-1]), task)
            analyzer = Analyzer(analysis_name="fidelity", model=model, task=task, cpu=True, log_level=logging.WARNING,
                                disable_tqdm=True, output_dir=str(Path(folder) / "kronfluence"))
            for method in args.methods:
                fit_seconds, results = run_kronfluence(analyzer, method, datasets, args)
                out[f"fit_seconds__{method}"] = np.float64(fit_seconds)
                for suffix, (scores, seconds) in results.items():
                    out[f"scores__{method}__{suffix}"] = scores
                    out[f"seconds__{method}__{suffix}"] = np.float64(fit_seconds + seconds)
                score_times = sorted({seconds for _, seconds in results.values()})
                print(f"  kronfluence {method:16s} fit {fit_seconds:6.2f}s, scores {np.median(score_times):6.2f}s "
                      f"per damping ({len(score_times)} computed)", flush=True)
                if method == "identity":
                    check_identity(results[HEURISTIC][0], reference)
        if not args.no_captum:
            for name, (scores, seconds) in run_tracin(build, checkpoints, arrays["learning_rates"], data,
                                                      args.batch_size, Path(folder)).items():
                out[f"scores__{name}"], out[f"seconds__{name}"] = scores, np.float64(seconds)
                print(f"  captum {name:21s} {seconds:6.2f}s", flush=True)

    print_sanity(out, reference, args.methods, args.damping_values, float(arrays["learning_rates"][-1]))
    common.save_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
