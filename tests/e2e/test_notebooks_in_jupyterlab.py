"""Every lesson runs cleanly in JupyterLab as a learner sees it: Restart Kernel and Run All Cells in Chromium.

All browser tests live in this one module, so `--dist loadscope` keeps them on one xdist worker with one
JupyterLab server and one browser; notebooks run one at a time, in one reused JupyterLab tab.
"""
from __future__ import annotations

import re

import nbformat
import pytest

from lab_browser import move_slider_changes_numbers, run_notebook
from lab_checks import Expected, expected_outputs, find_problems
from lab_server import FIXTURE_DIR, FIXTURE_FOLDER, lesson_notebooks

pytestmark = pytest.mark.e2e

LESSONS = lesson_notebooks()
BROKEN = FIXTURE_DIR / "broken_notebook.json"


def read(path):
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_notebook_runs_cleanly_in_jupyterlab(path, lab, lab_page):
    run = run_notebook(lab_page, lab, path.name, read(path), move_slider=path.name.startswith("06_"))
    print(run.summary())
    if run.problems:
        pytest.fail(run.summary(), pytrace=False)


@pytest.fixture(scope="module")
def broken_run(module_lab_page, lab):
    """The broken fixture run once in JupyterLab; it stays open (its kernel alive) for the slider tests."""
    run = run_notebook(module_lab_page, lab, f"{FIXTURE_FOLDER}/{BROKEN.stem}.ipynb", read(BROKEN))
    print(run.summary())
    return run, module_lab_page


def test_broken_notebook_fails_the_browser_check(broken_run):
    run, _ = broken_run
    planted = {(number, cell.metadata["e2e_expected_problem"])
               for number, cell in enumerate(read(BROKEN).cells, start=1) if "e2e_expected_problem" in cell.metadata}
    found = {(problem.cell, problem.kind) for problem in run.problems}
    assert found == planted, f"planted {sorted(planted)}, reported:\n{run.summary()}"


def test_a_failing_notebook_says_where_its_screenshot_is(broken_run):
    run, _ = broken_run
    assert run.screenshot.name == "broken_notebook-problem.png" and run.screenshot.is_file()
    assert f"screenshot: {run.screenshot}" in run.summary()


def test_moving_a_slider_changes_the_displayed_numbers(broken_run):
    _, page = broken_run  # the fixture's sliders run before its planted error, so the kernel is alive
    assert move_slider_changes_numbers(page, label=re.compile("amount")) == []


def test_a_slider_that_changes_no_number_is_reported(broken_run):
    _, page = broken_run
    problems = move_slider_changes_numbers(page, label=re.compile("frozen"), timeout=3)
    assert [p.kind for p in problems] == ["slider"], problems


# The checking function on hand-made views of one cell (no browser): what each kind of failure looks like.

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
