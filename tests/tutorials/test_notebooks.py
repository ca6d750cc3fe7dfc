"""Every tutorial notebook runs from top to bottom, and its committed outputs have the structure of a fresh run.

Each notebook is executed with nbclient, in a temporary working directory, by a kernel running this very Python
(see ``notebook_runner``), with ``MPLBACKEND=Agg`` and a timeout per cell. The committed notebook must hold the
outputs of a run (every code cell executed, no error), and a fresh run must produce the same structure: as many
code cells, and for each cell the same sequence of output types (a figure stays an ``image/png`` output, printed
text stays ``stdout``); the values themselves may differ.

Regenerate the committed outputs after editing a notebook::

    MPLBACKEND=Agg python -m tests.tutorials.notebook_runner [names...]
"""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.notebooks

_MISSING = [module for module in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(module) is None]
if _MISSING:
    _REASON = (f"the notebook tests need {', '.join(_MISSING)}: pip install nbclient nbformat ipykernel "
               "(part of the tests extras)")
    if os.environ.get("CI"):
        raise ImportError(_REASON)
    pytest.skip(_REASON, allow_module_level=True)

# pylint: disable=wrong-import-position
import nbformat

from .notebook_runner import CELL_TIMEOUT_S, execute_notebook, notebook_paths, structure_differences

NOTEBOOKS = ["getting_started", "benchmark_mislabeled", "first_order", "second_order", "tracin", "rps_l2", "rps_lje",
             "arnoldi", "boundary", "evaluating_attributions", "kfac", "index"]


def test_every_notebook_is_listed():
    """A notebook added to tutorials/ must be added here (and the other way round)."""
    assert sorted(path.stem for path in notebook_paths()) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook(name, tmp_path):
    """The committed notebook holds a run's outputs, runs again, and its outputs keep their structure."""
    path = notebook_paths()[0].parent / f"{name}.ipynb"
    assert path.exists(), f"{path} is missing"
    committed = nbformat.read(str(path), as_version=4)
    code_cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code_cells, f"{name}.ipynb has no code cell"
    not_run = [index for index, cell in enumerate(code_cells) if cell.execution_count is None]
    assert not not_run, (f"{name}.ipynb is committed without the outputs of code cells {not_run}; run "
                         f"`python -m tests.tutorials.notebook_runner {name}`")
    errors = [index for index, cell in enumerate(code_cells)
              if any(output.output_type == "error" for output in cell.outputs)]
    assert not errors, f"{name}.ipynb is committed with errors in code cells {errors}"

    # Raises nbclient's CellExecutionError (with the failing cell and its traceback) if a cell fails.
    executed, _ = execute_notebook(path, tmp_path, timeout=CELL_TIMEOUT_S)

    differences = structure_differences(committed, executed)
    assert not differences, (f"the outputs of {name}.ipynb changed structure; check the notebook, then regenerate "
                             f"them with `python -m tests.tutorials.notebook_runner {name}`:\n"
                             + "\n".join(differences))
