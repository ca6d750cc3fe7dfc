"""Execute the tutorial notebooks with nbclient and compare the structure of their outputs.

The kernel is always the Python running this module (a throw-away kernelspec pointing at ``sys.executable`` is
written to a temporary folder), so nothing has to be registered with Jupyter and a fresh virtual environment
works as it is.

Regenerate the committed outputs (from the repository root)::

    MPLBACKEND=Agg python -m tests.tutorials.notebook_runner            # every notebook of tutorials/
    MPLBACKEND=Agg python -m tests.tutorials.notebook_runner first_order tracin
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

TUTORIALS_DIR = Path(__file__).resolve().parents[2] / "tutorials"
KERNEL_NAME = "influenciae-tutorials"
CELL_TIMEOUT_S = 180

# Environment of the kernel: quiet TensorFlow, no GUI, reproducible hashing. The notebooks select the inline
# backend themselves (``%matplotlib inline``), so figures are still captured as image/png outputs.
KERNEL_ENV = {"MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}


def notebook_paths() -> List[Path]:
    """Every tutorial notebook, by name."""
    return sorted(TUTORIALS_DIR.glob("*.ipynb"))


def _write_kernelspec(folder: Path) -> None:
    """A kernelspec running ipykernel with this very interpreter.

    ``capture_fd_output=False``: C-level logs (TensorFlow/absl at import time, CUDA probing) stay on the kernel
    process's stderr instead of becoming notebook outputs.
    """
    spec_dir = folder / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.capture_fd_output=False"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def execute_notebook(source: Path, workdir: Path, timeout: int = CELL_TIMEOUT_S) -> Tuple[nbformat.NotebookNode, float]:
    """Run a copy of ``source`` in ``workdir`` (its working directory) and return it executed, with the run time.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        If a cell raises; the message holds the cell and the traceback.
    """
    notebook = nbformat.read(str(source), as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, workdir / source.name)
    with tempfile.TemporaryDirectory() as kernels:
        _write_kernelspec(Path(kernels))
        manager = KernelManager(kernel_name=KERNEL_NAME,
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = NotebookClient(notebook, km=manager, timeout=timeout, kernel_name=KERNEL_NAME,
                                resources={"metadata": {"path": str(workdir)}})
        saved_env = {name: os.environ.get(name) for name in KERNEL_ENV}
        os.environ.update(KERNEL_ENV)
        start = time.perf_counter()
        try:
            client.execute()
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        elapsed = time.perf_counter() - start
    # Keep the notebook opening with the reader's default Python kernel.
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    return notebook, elapsed


def output_kinds(cell: nbformat.NotebookNode) -> List[Tuple[str, ...]]:
    """The structure of a code cell's outputs, ignoring their values.

    * a stream becomes ``("stream", name)``; consecutive chunks of the same stream count once, and ``stderr``
      is left out (warnings depend on the versions installed);
    * a rich output becomes ``(output_type, *sorted mime types)``, e.g. ``("display_data", "image/png",
      "text/plain")``;
    * an error becomes ``("error", ename)``.
    """
    kinds: List[Tuple[str, ...]] = []
    for output in cell.get("outputs", []):
        kind_of = output["output_type"]
        if kind_of == "stream":
            if output["name"] == "stderr":
                continue
            kind: Tuple[str, ...] = ("stream", output["name"])
        elif kind_of == "error":
            kind = ("error", output.get("ename", ""))
        else:
            kind = (kind_of,) + tuple(sorted(output.get("data", {})))
        if not (kind[0] == "stream" and kinds and kinds[-1] == kind):
            kinds.append(kind)
    return kinds


def structure(notebook: nbformat.NotebookNode) -> List[List[Tuple[str, ...]]]:
    """``output_kinds`` of every code cell, in order."""
    return [output_kinds(cell) for cell in notebook.cells if cell.cell_type == "code"]


def structure_differences(committed: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> List[str]:
    """Human-readable differences between the output structures of two runs of a notebook (empty if none)."""
    before, after = structure(committed), structure(fresh)
    if len(before) != len(after):
        return [f"{len(before)} code cells committed, {len(after)} in the fresh run"]
    return [f"code cell {index}: committed {old}, fresh run {new}"
            for index, (old, new) in enumerate(zip(before, after)) if old != new]


def _strip_volatile(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop per-run metadata (execution timestamps) so that re-running only changes what the cells print."""
    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    return notebook


def main(argv: Optional[List[str]] = None) -> int:
    """Execute the named notebooks (default: all) and save them in place with their outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    args = parser.parse_args(argv)
    paths = notebook_paths()
    if args.names:
        wanted = set(args.names)
        paths = [path for path in paths if path.stem in wanted]
        missing = wanted - {path.stem for path in paths}
        if missing:
            parser.error(f"unknown notebooks: {sorted(missing)}")
    for path in paths:
        with tempfile.TemporaryDirectory() as workdir:
            executed, elapsed = execute_notebook(path, Path(workdir))
        nbformat.write(_strip_volatile(executed), str(path))
        print(f"{path.name}: {elapsed:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
