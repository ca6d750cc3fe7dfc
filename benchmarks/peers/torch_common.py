"""Torch-side helpers shared by the pyDVL and Captum workers (run in ``benchmarks/.venv-peers``)."""
import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch  # pylint: disable=import-error
from torch import nn  # pylint: disable=import-error

import common


def build_mlp(keras_weights: List[np.ndarray]) -> nn.Sequential:
    """The torch twin of the Keras MLP 64-32-10, loaded from Keras ``get_weights()`` (kernels transposed)."""
    sizes = common.LAYER_SIZES
    modules: List[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        modules.append(nn.Linear(int(fan_in), int(fan_out)))
        if index < len(sizes) - 2:
            modules.append(nn.ReLU())
    model = nn.Sequential(*modules)
    load_keras_weights(model, keras_weights)
    return model.eval()


def load_keras_weights(model: nn.Sequential, keras_weights: List[np.ndarray]) -> None:
    """Copy Keras weights into the Linear layers of ``model`` (in place)."""
    state = common.keras_to_torch_state(keras_weights)
    linears = [module for module in model if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for position, linear in enumerate(linears):
            linear.weight.copy_(torch.from_numpy(state[2 * position]))
            linear.bias.copy_(torch.from_numpy(state[2 * position + 1]))


def tensors(arrays: Dict[str, np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test`` as torch tensors (float32 inputs, int64 labels)."""
    return (torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]),
            torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))


def parse_args(description: str, tasks: Tuple[str, ...]) -> argparse.Namespace:
    """Command line shared by the torch workers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=tasks, required=True)
    parser.add_argument("--problem", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    common.add_task_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def timed_phases(phases: Dict[str, Callable[[], Any]], repeats: int) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Run the phases in order ``repeats + 1`` times; the first round is the warm-up (first call).

    Returns
    -------
    tuple
        The values of the last round, and ``time_<phase>`` summaries (see :func:`common.summary`).
    """
    values: Dict[str, Any] = {}
    firsts: Dict[str, float] = {}
    others: Dict[str, List[float]] = {name: [] for name in phases}
    for repeat in range(repeats + 1):
        for name, phase in phases.items():
            values[name], seconds, _ = common.time_repeats(phase, 0)
            if repeat == 0:
                firsts[name] = seconds
            else:
                others[name].append(seconds)
    return values, {f"time_{name}": common.summary(firsts[name], others[name]) for name in phases}
