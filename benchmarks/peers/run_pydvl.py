"""pyDVL worker of the peer benchmark (runs in ``benchmarks/.venv-peers``).

Tasks on the torch twin of the trained MLP (all parameters, P = 2,410), loss ``F.cross_entropy`` (mean over
the batch, so pyDVL's Hessian is the mean-loss Hessian: it averages batch Hessians weighted by batch size),
regularization λ = 0.1 added to the diagonal (pyDVL solves ``(H + λI) x = b``, like our ``regularization``):

* ``exact``: ``DirectInfluence`` (full Hessian, ``torch.linalg.solve``);
* ``cg``: ``CgInfluence`` (block CG over all right-hand sides, ``rtol = sqrt(--cg-rtol)``, ``atol = 0``: see
  ``make_model``);
* ``arnoldi``: ``ArnoldiInfluence`` (ARPACK, ``rank`` eigenpairs of largest magnitude, ``krylov_dimension``).

Values are pyDVL's raw ``influences(..., mode=InfluenceMode.Up)``: the orchestrator aligns the sign.
pyDVL has no self-influence entry point: self-influence is the diagonal of ``influences(x_b, y_b)`` on
blocks of 256 training samples (each block costs one (256, 256) product; the diagonal is what we keep).
"""
import sys
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position
import torch_common  # noqa: E402  pylint: disable=wrong-import-position

import torch  # noqa: E402  pylint: disable=import-error,wrong-import-position,wrong-import-order
from torch.nn import functional  # noqa: E402  pylint: disable=import-error,wrong-import-position,wrong-import-order
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402  pylint: disable=import-error,C0413,C0411
from pydvl.influence import InfluenceMode  # noqa: E402  pylint: disable=import-error,C0413,C0411
from pydvl.influence.torch import (ArnoldiInfluence, CgInfluence,  # noqa: E402  pylint: disable=import-error,C0413
                                   DirectInfluence)

SELF_BLOCK = 256


def make_model(task: str, model: torch.nn.Module, args: Any) -> Any:
    """The unfitted pyDVL influence model of a task."""
    loss = functional.cross_entropy
    if task == "exact":
        return DirectInfluence(model, loss, regularization=common.REGULARIZATION)
    if task == "cg":
        # pyDVL 0.10's block CG stops a column when ||r|| <= rtol**2 * ||b|| (the squared tolerance is compared
        # with the unsquared norm): rtol = sqrt(target) gives the relative residual target our CG uses.
        return CgInfluence(model, loss, regularization=common.REGULARIZATION, rtol=args.cg_rtol ** 0.5, atol=0.0,
                           maxiter=args.cg_maxiter, solve_simultaneously=True, warn_on_max_iteration=False)
    if task == "arnoldi":
        return ArnoldiInfluence(model, loss, regularization=common.REGULARIZATION, rank=args.rank,
                                krylov_dimension=args.krylov)
    raise ValueError(f"unknown task {task!r}")


def main() -> int:
    """Time fit, pairwise matrix and self-influence; write values, timings, peak RSS and IHVP factors."""
    args = torch_common.parse_args(__doc__, ("exact", "cg", "arnoldi"))
    warnings.filterwarnings("ignore")
    arrays, checkpoints = common.load_problem(args.problem)
    model = torch_common.build_mlp(checkpoints[-1])
    x_train, y_train, x_test, y_test = torch_common.tensors(arrays)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=common.TRAIN_BATCH)
    state: Dict[str, Any] = {}

    def fit() -> Any:
        state["influence"] = make_model(args.task, model, args).fit(loader)
        return state["influence"]

    def pair() -> np.ndarray:
        return state["influence"].influences(x_test, y_test, x_train, y_train, mode=InfluenceMode.Up).detach().numpy()

    def self_influence() -> np.ndarray:
        parts = []
        for start in range(0, x_train.shape[0], SELF_BLOCK):
            x_block, y_block = x_train[start:start + SELF_BLOCK], y_train[start:start + SELF_BLOCK]
            block = state["influence"].influences(x_block, y_block, mode=InfluenceMode.Up)
            parts.append(torch.diagonal(block).detach().numpy())
        return np.concatenate(parts)

    values, out = torch_common.timed_phases({"fit": fit, "pair": pair, "self": self_influence}, args.repeats)
    out.update(pair=values["pair"], self=values["self"], rss_mib=np.float64(common.peak_rss_mib()))
    factors = state["influence"].influence_factors(x_test, y_test).detach().numpy()
    out["factors"] = common.torch_to_keras_flat(factors)
    np.savez(args.output, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
