"""The structure comparison used by the notebook tests (fast: no kernel is started)."""
import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

# pylint: disable=wrong-import-position
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from .notebook_runner import output_kinds, structure_differences


def _figure():
    return new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})


def _notebook(*cells):
    return new_notebook(cells=[new_markdown_cell("# title"), *cells])


def test_values_may_change_but_not_types():
    """Printed values may differ between runs; a figure turning into text may not."""
    committed = _notebook(new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="1\n")]),
                          new_code_cell("plot()", outputs=[_figure()]))
    same_structure = _notebook(new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="2\n")]),
                               new_code_cell("plot()", outputs=[_figure()]))
    figure_lost = _notebook(new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="1\n")]),
                            new_code_cell("plot()", outputs=[new_output("display_data",
                                                                        data={"text/plain": "<Figure>"})]))
    assert not structure_differences(committed, same_structure)
    assert structure_differences(committed, figure_lost) == [
        "code cell 1: committed [('display_data', 'image/png', 'text/plain')], fresh run "
        "[('display_data', 'text/plain')]"]


def test_cell_count_and_missing_outputs_are_reported():
    """Lost outputs and a different number of code cells are differences."""
    committed = _notebook(new_code_cell("plot()", outputs=[_figure()]))
    assert structure_differences(committed, _notebook(new_code_cell("plot()"))) == [
        "code cell 0: committed [('display_data', 'image/png', 'text/plain')], fresh run []"]
    assert structure_differences(committed, _notebook(new_code_cell("plot()", outputs=[_figure()]),
                                                      new_code_cell("x = 1")))


def test_stderr_is_ignored_and_stream_chunks_merged():
    """Warnings on stderr depend on the versions installed; stdout may arrive in several chunks."""
    cell = new_code_cell("run()", outputs=[new_output("stream", name="stdout", text="a"),
                                           new_output("stream", name="stderr", text="warning"),
                                           new_output("stream", name="stdout", text="b"),
                                           _figure(),
                                           new_output("error", ename="ValueError", evalue="", traceback=[])])
    assert output_kinds(cell) == [("stream", "stdout"), ("display_data", "image/png", "text/plain"),
                                  ("error", "ValueError")]
