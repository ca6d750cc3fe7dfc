"""On-disk form of a K-FAC / EK-FAC fit: one NumPy archive per completed stage, each with a fingerprint.

A directory holds ``covariances.npz``, ``eigendecompositions.npz`` and (EK-FAC) ``corrected_eigenvalues.npz``,
written atomically (a temporary file renamed over the final name, so a killed run leaves either the whole stage or
nothing), and, after :meth:`~.kfac_ihvp.KFACIHVP.save`, a ``manifest.json`` naming the solver and its blocks.
Arrays are stored under ``"<block index>/<field>"``; ``fingerprint`` is a SHA-256 of what the stage depends on
(the watched weights' names and values, the blocks, the Fisher settings, the data's size and element spec).
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np

FORMAT_VERSION = 1
STAGES = ("covariances", "eigendecompositions", "corrected_eigenvalues")
STAGE_FIELDS = {"covariances": ("activation_sum", "gradient_sum", "rows_count", "samples"),
                "eigendecompositions": ("rows_values", "rows_basis", "outputs_values", "outputs_basis"),
                "corrected_eigenvalues": ("corrected",)}
State = Dict[str, Dict[str, np.ndarray]]


class ForeignStageError(ValueError):
    """A saved stage was fitted for other weights or settings."""


def fingerprint(configuration: Dict[str, Any], weights: Iterable[Any]) -> str:
    """SHA-256 of a JSON-able configuration and of the weights' paths and values."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, **configuration}, sort_keys=True).encode())
    for weight in weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return digest.hexdigest()


def stage_path(directory: Path, stage: str) -> Path:
    """Where a stage is stored in ``directory``."""
    return Path(directory) / f"{stage}.npz"


def write_stage(directory: Path, stage: str, state: State, stage_fingerprint: str) -> Path:
    """Write the fields of ``stage`` held in ``state`` to ``directory`` atomically; returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"fingerprint": np.array(stage_fingerprint)}
    for index, fields in state.items():
        for field, value in fields.items():
            if field in STAGE_FIELDS[stage]:
                arrays[f"{index}/{field}"] = value
    path = stage_path(directory, stage)
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(temporary, path)
    return path


def read_stage(directory: Path, stage: str, stage_fingerprint: str) -> Optional[State]:
    """The fields of a stage saved in ``directory`` (None when it is missing).

    Raises
    ------
    ForeignStageError
        If it was saved with another fingerprint.
    ValueError
        If the file cannot be read.
    """
    path = stage_path(directory, stage)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"The {stage} file {str(path)!r} cannot be read ({error}); delete it to refit.") from error
    if str(stored.pop("fingerprint", "")) != stage_fingerprint:
        raise ForeignStageError(f"The {stage} saved in {str(directory)!r} were fitted for other weights, data shapes, "
                                "blocks or Fisher settings than this model's.")
    state: State = {}
    for key, value in stored.items():
        index, field = key.split("/")
        state.setdefault(index, {})[field] = value
    return state


def write_manifest(directory: Path, manifest: Dict[str, Any]) -> None:
    """``manifest.json`` (atomically)."""
    path = Path(directory) / "manifest.json"
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps({"format": FORMAT_VERSION, **manifest}, indent=1))
    os.replace(temporary, path)


def read_manifest(directory: Path) -> Dict[str, Any]:
    """The manifest of a saved fit.

    Raises
    ------
    ValueError
        If ``directory`` has no readable manifest.
    """
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise ValueError(f"{str(directory)!r} holds no K-FAC factors (no manifest.json).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"The manifest {str(path)!r} is not valid JSON ({error}).") from error
