"""Every lesson runs cleanly in JupyterLab as a learner sees it: Restart Kernel and Run All Cells in Chromium.

All browser tests live in this one module, so `--dist loadscope` keeps them on one xdist worker with one
JupyterLab server and one browser; notebooks run one at a time, in one reused JupyterLab tab.
"""
from __future__ import annotations

import re

import nbformat
import pytest

from lab_browser import move_slider_changes_numbers, run_notebook
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
