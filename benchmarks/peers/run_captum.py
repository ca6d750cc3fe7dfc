"""Captum worker of the peer benchmark (runs in ``benchmarks/.venv-peers``).

Task ``tracin``: ``TracInCP`` over the checkpoints.

Captum's TracInCP score is ``Σ_k lr_k ∇ℓ_k(t)·∇ℓ_k(z)`` where ``lr_k`` is what ``checkpoints_load_func``
returns for checkpoint k: the same convention as our ``TracIn(models, learning_rates)``. Per-sample
gradients: the loss is ``CrossEntropyLoss(reduction="sum")`` with ``sample_wise_grads_per_batch=True``
(Captum's fast path: per-example gradients from layer hooks, not one backward pass per sample); with
a sum reduction each sample's gradient is its own loss gradient, with no 1/n factor. All Linear layers
are used (Captum's default when ``layers`` is None).

Task ``exact``: ``NaiveInfluenceFunction`` on the last checkpoint, ``projection_dim = P`` (every eigenpair of the
explicit Hessian kept). Captum's Hessian is that of the loss summed over the training set, ``n H_mean`` (with
``reduction="sum"``), and ``hessian_reg`` is added to that matrix. So ``hessian_reg = n λ`` gives
``(n (H_mean + λI))⁻¹ = (H_mean + λI)⁻¹ / n``, and Captum's values are multiplied by ``n`` here to be on our
scale (``g(t)ᵀ (H_mean + λI)⁻¹ g(z)``, the same sign). ``hessian_inverse_tol`` is set to 0 (λ > 0 already makes
the damped Hessian positive definite on this model).

The checkpoint files (torch state dicts converted from the Keras weights) are written once before the
timing, in a temporary directory.
"""
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position
import torch_common  # noqa: E402  pylint: disable=wrong-import-position

import torch  # noqa: E402  pylint: disable=import-error,wrong-import-position,wrong-import-order
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402  pylint: disable=import-error,C0413,C0411
from captum.influence import NaiveInfluenceFunction, TracInCP  # noqa: E402  pylint: disable=E0401,C0413,C0411


def main() -> int:
    """Time construction, the pairwise matrix and the training self-influence; write the result file."""
    args = torch_common.parse_args(__doc__, ("tracin", "exact"))
    arrays, checkpoints = common.load_problem(args.problem)
    rates = [float(rate) for rate in arrays["learning_rates"]]
    model = torch_common.build_mlp(checkpoints[-1])
    x_train, y_train, x_test, y_test = torch_common.tensors(arrays)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=common.TRAIN_BATCH)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, weights in enumerate(checkpoints):
            twin = torch_common.build_mlp(weights)
            path = str(Path(folder) / f"checkpoint_{index}.pt")
            torch.save(twin.state_dict(), path)
            paths.append(path)
        learning_rate_of = dict(zip(paths, rates))

        def load_checkpoint(target: torch.nn.Module, path: str) -> float:
            target.load_state_dict(torch.load(path))
            return learning_rate_of[path]

        state: Dict[str, Any] = {}

        n_train = float(x_train.shape[0])
        scale = n_train if args.task == "exact" else 1.0

        def fit() -> Any:
            if args.task == "exact":
                n_params = sum(parameter.numel() for parameter in model.parameters())
                state["calc"] = NaiveInfluenceFunction(model, loader, paths[-1], checkpoints_load_func=load_checkpoint,
                                                       loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                                                       batch_size=common.TRAIN_BATCH, sample_wise_grads_per_batch=True,
                                                       projection_dim=n_params,
                                                       hessian_reg=n_train * common.REGULARIZATION,
                                                       hessian_inverse_tol=0.0)
            else:
                state["calc"] = TracInCP(model, loader, paths, checkpoints_load_func=load_checkpoint,
                                         loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                                         batch_size=common.TRAIN_BATCH, sample_wise_grads_per_batch=True)
            return state["calc"]

        phases = {"fit": fit,
                  "pair": lambda: scale * state["calc"].influence((x_test, y_test)).detach().numpy(),
                  "self": lambda: scale * state["calc"].self_influence(None).detach().numpy()}
        values, out = torch_common.timed_phases(phases, args.repeats)
    out.update(pair=values["pair"], self=values["self"], rss_mib=np.float64(common.peak_rss_mib()))
    np.savez(args.output, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
