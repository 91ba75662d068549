"""The browser-free half of the browser tests: `lab_checks.find_problems` on hand-made views of one cell.

No Chromium and no JupyterLab are needed, so these run in `make unit` too (not marked e2e): each kind of
failure a learner could see is shown to be reported, and healthy output is shown not to be.
"""
from __future__ import annotations

import nbformat
import pytest

from lab_checks import Expected, expected_outputs, find_problems


def _seen(**rendered):
    base = {"prompt": "[1]:", "texts": [], "widget_errors": [], "images": 0, "broken_images": 0,
            "widgets": 0, "progress_bars": 0, "dead_widgets": []}
    return [{**base, **rendered}]


def _notebook(outputs=(), tags=(), execution_count=1):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fit(model, loaders.train, loaders.val, epochs=3)", outputs=list(outputs),
                                     execution_count=execution_count)
    cell.metadata["tags"] = list(tags)
    nb.cells = [cell]
    return nb


PLOT = nbformat.v4.new_output("display_data", data={"image/png": "iVBOR", "text/plain": "<Figure>"})
BAR = nbformat.v4.new_output("display_data", data={
    "application/vnd.jupyter.widget-view+json": {"model_id": "ab12", "version_major": 2, "version_minor": 0},
    "text/plain": "  0%|          | 0/3 [00:00<?, ?it/s]"})
ERROR = nbformat.v4.new_output("error", ename="ValueError", evalue="bad shape", traceback=[])


def test_committed_outputs_count_plots_widgets_and_progress_bars():
    assert expected_outputs(_notebook([PLOT, BAR]).cells[0]) == Expected(images=1, widgets=1, progress_bars=1)


def test_a_healthy_cell_has_no_problem():
    nb = _notebook([PLOT, BAR])
    assert find_problems(nb, nb, _seen(images=1, widgets=1, progress_bars=1)) == []


@pytest.mark.parametrize("ran, seen, kind", [
    (_notebook(execution_count=None), _seen(prompt="[ ]:"), "not-run"),
    (_notebook([ERROR]), _seen(), "error"),
    (_notebook(), _seen(widget_errors=["---\nTraceback (most recent call last)\nValueError: x"]), "error"),
    (_notebook(), _seen(texts=["epochs:  40%|████      | 2/5 [00:01<00:01]"]), "progress-text"),
    (_notebook(), _seen(texts=["IntSlider(value=3)"]), "widget-text"),
    (_notebook(), _seen(dead_widgets=["Loading widget..."]), "dead-widget"),
    (_notebook(), _seen(broken_images=1), "plot"),
], ids=["not-run", "error", "error-in-widget", "progress-text", "widget-text", "dead-widget", "broken-img"])
def test_each_failure_is_reported(ran, seen, kind):
    assert [p.kind for p in find_problems(_notebook(), ran, seen)] == [kind]


def test_a_widget_closed_before_the_notebook_was_saved_is_not_expected():
    nb = _notebook([BAR])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"other": {}}}}
    assert find_problems(nb, nb, _seen()) == []


def test_plots_and_widgets_that_do_not_render_are_reported():
    nb = _notebook([PLOT, BAR])
    assert {p.kind for p in find_problems(nb, nb, _seen())} == {"plot", "progress", "widget"}


def test_an_error_in_a_cell_tagged_raises_exception_is_allowed():
    nb = _notebook([ERROR], tags=["raises-exception"])
    assert find_problems(nb, nb, _seen()) == []


def test_an_error_printed_on_purpose_and_a_matplotlib_text_are_not_problems():
    seen = _seen(texts=["ValueError: shown on purpose\n", "Text(0.5, 1.0, 'loss')"])
    assert find_problems(_notebook(), _notebook(), seen) == []


def test_a_different_number_of_cells_is_reported():
    assert [p.kind for p in find_problems(_notebook(), _notebook(), _seen() * 2)] == ["cells"]
