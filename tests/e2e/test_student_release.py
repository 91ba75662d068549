"""The student release in JupyterLab as a learner meets it (issue 20): `make student`'s 00_setup opens with no
pop-up and not marked unsaved, under the settings `make student-lab` ships (jupyter/); a correct answer's
check says passed and a wrong one's says failed, with its hint, in the page.

Its own JupyterLab server (this module's, one xdist worker under --dist loadscope) serves the release and
reads the repository's jupyter/ folder instead of the other browser tests' command-line options.
"""
from __future__ import annotations

import shutil
import subprocess

import nbformat
import pytest

from lab_browser import PlaywrightError, click_menu, close_notebook, open_notebook, wait_until_idle
from lab_server import LAB_SETTINGS, ROOT, LabError, LabServer, isolated_jupyter_env, private_tmp_dir

pytestmark = pytest.mark.e2e

LESSON = "00_setup.ipynb"
STALE = "stale_kernelspec.ipynb"  # the release with the kernelspec lessons had before `make normalise`
# Only what the test harness needs (no autosave, every cell in the DOM); nothing about news or updates.
HARNESS_SETTINGS = {name: value for name, value in LAB_SETTINGS.items() if "notification" not in name}
CORRECT_Q1 = '''def seeded_twice():
    torch.manual_seed(0)
    first = three_random_numbers()
    torch.manual_seed(0)
    return first, three_random_numbers()'''

CELL_TEXT_JS = """index => {
  const cell = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[index];
  const area = cell && cell.querySelector('.jp-Cell-outputArea');
  return area ? area.innerText : '';
}"""
POPUPS_JS = """() => Array.from(document.querySelectorAll('.Toastify__toast, .jp-Dialog'))
    .map(e => (e.innerText || '').trim())"""
DIRTY_JS = "() => document.querySelectorAll('.lm-TabBar-tab.jp-mod-dirty, .jp-mod-dirty .lm-TabBar-tabLabel').length"


@pytest.fixture(scope="module")
def release_lab(chromium):
    """`make student` for 00_setup (checks not rerun: test_student and nbval cover them), served by JupyterLab."""
    with private_tmp_dir() as workdir:
        release = workdir / "release"
        result = subprocess.run(
            ["make", "--no-print-directory", "-o", ".venv/.installed-from-pyproject", "student",
             f"NOTEBOOKS=notebooks/{LESSON}", f"STUDENT={release / 'student'}", f"AUTOGRADER={release / 'autograder'}",
             f"OTTER_BUILD={release / 'build'}", "OTTER_ASSIGN_ARGS=--no-run-tests"],
            cwd=ROOT, env=isolated_jupyter_env(workdir), capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        stale = nbformat.read(release / "student" / LESSON, as_version=4)
        stale.metadata.kernelspec.display_name = "Python 3"
        nbformat.write(stale, release / "student" / STALE)
        shutil.rmtree(release / "build")
        server = LabServer(release / "student", workdir, options=[], settings=HARNESS_SETTINGS,
                           config_path=ROOT / "jupyter")
        page = chromium.new_page()
        yield server, page
        page.close()
        server.stop()


@pytest.fixture
def lab(release_lab):
    """The release's server and its tab; the test's notebook is closed (unsaved changes discarded) afterwards."""
    server, page = release_lab
    yield server, page
    try:
        close_notebook(page)
    except (PlaywrightError, LabError):
        pass
    server.shut_down_kernels()


def test_the_student_release_opens_clean_with_no_popup(lab):
    server, page = lab
    cells = len(nbformat.read(server.root / LESSON, as_version=4).cells)
    open_notebook(page, server, LESSON, cells)
    page.wait_for_timeout(5000)  # kernel info and the news question both arrive a moment after the kernel starts
    assert page.evaluate(POPUPS_JS) == [], "JupyterLab showed a pop-up"
    assert page.evaluate(DIRTY_JS) == 0, f"{LESSON} is marked unsaved right after opening"


def test_a_stale_kernelspec_is_what_marks_a_notebook_unsaved(lab):
    """The check above can fail: the kernelspec the lessons had (display name "Python 3") is rewritten on open."""
    server, page = lab
    open_notebook(page, server, STALE, len(nbformat.read(server.root / STALE, as_version=4).cells))
    page.wait_for_function(f"({DIRTY_JS})() > 0", timeout=30_000)


def test_checks_pass_on_a_correct_answer_and_fail_with_a_hint_on_a_wrong_one(lab):
    server, page = lab
    notebook = nbformat.read(server.root / LESSON, as_version=4)
    answers = [i for i, c in enumerate(notebook.cells) if "otter_answer_cell" in c.metadata.get("tags", [])
               and c.cell_type == "code"]
    checks = {c.source: i for i, c in enumerate(notebook.cells) if c.source.startswith("grader.check(")}
    open_notebook(page, server, LESSON, len(notebook.cells))
    editor = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(answers[0]).locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(CORRECT_Q1)  # exercise 1 answered; exercise 3 left as handed out
    click_menu(page, "Run", "Run All Cells")
    assert wait_until_idle(page) is None, "Run All did not finish"
    passed = page.evaluate(CELL_TEXT_JS, checks['grader.check("q1")'])
    failed = page.evaluate(CELL_TEXT_JS, checks['grader.check("q3")'])
    assert "q1 passed!" in passed, f"exercise 1's check shows {passed!r}"
    assert "q3 results:" in failed and "Test case failed" in failed, f"exercise 3's check shows {failed!r}"
    assert "same_twice(fn) seeds with seed_everything(0)" in failed, "the failure_message hint is not shown"
    assert "# BEGIN SOLUTION" not in page.locator(".jp-NotebookPanel").inner_text()
    assert page.evaluate(POPUPS_JS) == [], "a pop-up appeared while the notebook ran"
