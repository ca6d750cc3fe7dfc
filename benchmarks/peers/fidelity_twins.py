"""Torch twins of the Keras models of the fidelity benchmark (run in ``benchmarks/.venv-peers``).

Two architectures, both ending in logits (10 classes):

* ``mlp``: ``Input(64) → Dense(h, relu) for h in hidden_units → Dense(10)``;
* ``cnn``: input NHWC ``(N, 8, 8, 1)``, ``Conv2D(8, 3, valid, relu) → Conv2D(16, 3, valid, relu) → Flatten →
  Dense(32, relu) → Dense(10)``.

Weight mapping from Keras ``get_weights()``
-------------------------------------------
* Dense kernel ``(in, out)`` → ``nn.Linear.weight`` ``(out, in)`` (transposed); biases unchanged.
* Conv2D kernel ``(kh, kw, in, out)`` → ``nn.Conv2d.weight`` ``(out, in, kh, kw)``; both frameworks compute a
  cross-correlation, so no flip. ``padding="valid"`` is ``padding=0`` (an int: Captum's per-sample gradients
  reject string paddings).
* The CNN twin takes the same NHWC input as Keras and permutes it to NCHW itself. Keras' ``Flatten`` flattens
  an NHWC tensor in ``(h, w, c)`` order, so the twin permutes the conv output back to NHWC before flattening:
  the Dense kernel (256, 32) then maps unchanged (transposed only).

The twins are plain ``nn.Sequential``/``nn.Module`` trees of ``nn.Linear`` and ``nn.Conv2d`` (plus parameter-free
activations), the module types that kronfluence tracks and that Captum's fast per-sample gradients support.
:func:`check_twin` compares the twin's logits with those Keras saved (``logits_test``).
"""
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch  # pylint: disable=import-error
from torch import nn  # pylint: disable=import-error

N_CLASSES = 10
INPUT_FEATURES = 64


class NHWCConvNet(nn.Module):
    """Torch twin of the Keras CNN; takes NHWC inputs like Keras."""

    def __init__(self, output_bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=0)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=0)
        self.dense = nn.Linear(4 * 4 * 16, 32)
        self.out = nn.Linear(32, N_CLASSES, bias=output_bias)
        self.relu = nn.ReLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """Logits of an NHWC batch ``(N, 8, 8, 1)``."""
        hidden = self.relu(self.conv1(inputs.permute(0, 3, 1, 2)))
        hidden = self.relu(self.conv2(hidden))
        hidden = torch.flatten(hidden.permute(0, 2, 3, 1), start_dim=1)  # Keras' (h, w, c) flattening order
        return self.out(self.relu(self.dense(hidden)))


def _parameter_modules(model: nn.Module) -> List[nn.Module]:
    """The Linear and Conv2d modules of ``model``, in forward (= Keras weight list) order."""
    return [module for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def load_keras_weights(model: nn.Module, keras_weights: Sequence[np.ndarray]) -> None:
    """Copy a Keras ``get_weights()`` list into the Linear/Conv2d layers of ``model`` (in place).

    Parameters
    ----------
    model
        A twin built by :func:`build_twin`.
    keras_weights
        ``[kernel, bias, kernel, bias, ...]`` in layer order (no bias for a layer built without one, e.g. the
        bias-free output layer the representer-point methods need); Dense kernels ``(in, out)``, Conv2D kernels
        ``(kh, kw, in, out)``.
    """
    modules = _parameter_modules(model)
    expected = sum(2 if module.bias is not None else 1 for module in modules)
    if len(keras_weights) != expected:
        raise ValueError(f"{len(keras_weights)} Keras weights for {len(modules)} layers (expected {expected}: a kernel "
                         f"and, where the layer has one, a bias)")
    weights = iter(keras_weights)
    with torch.no_grad():
        for position, module in enumerate(modules):
            kernel = next(weights)
            bias = next(weights) if module.bias is not None else None
            weight = np.transpose(kernel, (3, 2, 0, 1)) if isinstance(module, nn.Conv2d) else kernel.T
            if tuple(weight.shape) != tuple(module.weight.shape) or (
                    bias is not None and tuple(bias.shape) != tuple(module.bias.shape)):
                raise ValueError(f"layer {position}: Keras kernel {kernel.shape} / bias "
                                 f"{None if bias is None else bias.shape} do not fit {module}")
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if bias is not None:
                module.bias.copy_(torch.from_numpy(np.asarray(bias)))


def build_twin(kind: str, hidden_units: Sequence[int], keras_weights: Sequence[np.ndarray],
               dtype: torch.dtype = torch.float64) -> nn.Module:
    """The torch twin of a Keras model of the benchmark, loaded with its weights, in eval mode.

    Parameters
    ----------
    kind
        ``"mlp"`` or ``"cnn"``.
    hidden_units
        Widths of the hidden Dense layers (``mlp`` only).
    keras_weights
        Keras ``get_weights()`` list; an odd length means the output layer has no bias.
    dtype
        Parameter dtype of the twin (the inputs must be cast to it).

    Returns
    -------
    nn.Module
        The twin; logits for inputs shaped like Keras' (``(N, 64)`` or NHWC ``(N, 8, 8, 1)``).
    """
    output_bias = len(keras_weights) % 2 == 0  # every layer has a kernel and a bias, or the output has no bias
    if kind == "mlp":
        modules: List[nn.Module] = []
        fan_in = INPUT_FEATURES
        for width in hidden_units:
            modules += [nn.Linear(fan_in, int(width)), nn.ReLU()]
            fan_in = int(width)
        modules.append(nn.Linear(fan_in, N_CLASSES, bias=output_bias))
        model: nn.Module = nn.Sequential(*modules)
    elif kind == "cnn":
        model = NHWCConvNet(output_bias)
    else:
        raise ValueError(f"unknown model kind {kind!r} (expected 'mlp' or 'cnn')")
    model = model.to(dtype)
    load_keras_weights(model, keras_weights)
    return model.eval()


def check_twin(model: nn.Module, x_test: np.ndarray, keras_logits: np.ndarray, tolerance: float = 1e-4) -> float:
    """Check that the twin reproduces the logits Keras computed for the test inputs.

    Parameters
    ----------
    model
        The twin (loaded with the same checkpoint as ``keras_logits``).
    x_test
        Test inputs as stored in the problem file.
    keras_logits
        ``(T, 10)`` Keras logits of ``x_test``.
    tolerance
        Allowed ``|torch - keras|``, absolute and relative (``np.allclose(atol=rtol=tolerance)``).

    Returns
    -------
    float
        The largest absolute difference.

    Raises
    ------
    ValueError
        With a message naming the largest difference when the twin does not match.
    """
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(x_test)).to(dtype)).double().numpy()
    reference = np.asarray(keras_logits, dtype=np.float64)
    if logits.shape != reference.shape:
        raise ValueError(f"torch twin logits have shape {logits.shape}, Keras' logits_test {reference.shape}")
    difference = float(np.max(np.abs(logits - reference)))
    if not np.allclose(logits, reference, atol=tolerance, rtol=tolerance):
        raise ValueError(f"the torch twin does not reproduce Keras' logits_test: max |difference| = {difference:.3e} "
                         f"(tolerance {tolerance:.0e}, max |logit| = {np.max(np.abs(reference)):.3e}); check the "
                         f"weight layout (kernel transposes, NHWC flattening order) and the architecture")
    return difference


def twin_builder(arrays: Dict[str, np.ndarray], dtype: torch.dtype) -> Callable[[Sequence[np.ndarray]], nn.Module]:
    """``weights -> torch twin`` of the model a problem file describes (its ``model_kind`` and ``hidden_units``)."""
    kind = str(arrays["model_kind"])
    hidden = [int(width) for width in arrays.get("hidden_units", np.zeros(0, np.int64))]
    return lambda weights: build_twin(kind, hidden, weights, dtype)


def checkpoint_files(build: Callable[[Sequence[np.ndarray]], nn.Module], checkpoints: Sequence[Sequence[np.ndarray]],
                     rates: Sequence[float], folder: Path) -> Tuple[List[str], Callable[[nn.Module, str], float]]:
    """The checkpoints' state dicts saved as files in ``folder``, and Captum's ``checkpoints_load_func``: it loads
    one into a model and returns its learning rate."""
    paths = []
    for index, weights in enumerate(checkpoints):
        path = str(Path(folder) / f"checkpoint_{index}.pt")
        torch.save(build(weights).state_dict(), path)
        paths.append(path)
    rate_of = dict(zip(paths, (float(rate) for rate in rates)))

    def load_checkpoint(target: nn.Module, path: str) -> float:
        target.load_state_dict(torch.load(path))
        return rate_of[path]

    return paths, load_checkpoint
