"""Every lesson notebook follows the anatomy of design.md §2-§3, so nbval and learners can rely on it."""
import re

import pytest

from notebook_utils import NOTEBOOK_DIR, NOTEBOOKS, code_cells, output_text, read, tagged

FIRST_LESSONS = ["00_setup", "01_define", "02_train"]
IGNORE_MARK = re.compile(r"^\s*#\s*NBVAL_IGNORE_OUTPUT\s*$", re.MULTILINE)
PRIVATE_PATH = re.compile(r"(/home/\w|/root/|/Users/\w|[A-Z]:\\Users\\|/work/|/tmp/|/private/var/)")


def test_the_course_has_its_first_lessons():
    names = [p.stem for p in NOTEBOOKS]
    assert names, f"no NN_topic.ipynb notebooks in {NOTEBOOK_DIR}"
    assert set(FIRST_LESSONS) <= set(names)


def test_notebook_file_names_are_numbered_topics():
    for path in NOTEBOOK_DIR.glob("*.ipynb"):
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"{path.name} is not NN_topic.ipynb"
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(numbers) == len(set(numbers)), f"two notebooks share a number: {numbers}"


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return request.param, read(request.param)


def test_first_cell_states_title_objectives_prerequisites_and_run_time(notebook):
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be markdown"
    text = first.source.lower()
    assert first.source.lstrip().startswith("# "), f"{path.name}: the first cell must start with a '# ' title"
    for word in ("objectives", "prerequisites", "run time"):
        assert word in text, f"{path.name}: the first cell does not mention '{word}'"


def test_first_code_cell_sets_inline_plots(notebook):
    path, nb = notebook
    assert "%matplotlib inline" in code_cells(nb)[0].source, f"{path.name}: first code cell lacks %matplotlib inline"


def test_executed_top_to_bottom_in_a_fresh_kernel(notebook):
    path, nb = notebook
    counts = [cell.execution_count for cell in code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: execution counts {counts} are not 1..n"


def test_no_error_outputs_so_run_all_reaches_the_end(notebook):
    path, nb = notebook
    for cell in code_cells(nb):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: a cell has an error output: {errors[0].ename}: {errors[0].evalue}"


def test_outputs_hold_no_private_paths(notebook):
    path, nb = notebook
    for cell in code_cells(nb):
        found = PRIVATE_PATH.search(output_text(cell))
        assert not found, f"{path.name}: an output shows a machine path {found.group(0)!r}: print relative paths"


def test_no_svg_figures_and_varying_cells_are_ignored(notebook):
    path, nb = notebook
    for cell in code_cells(nb):
        assert not any("image/svg+xml" in o.get("data", {}) for o in cell.outputs), f"{path.name}: SVG figure"
        varies = re.search(r"clear_output|^%%time|%timeit", cell.source, re.MULTILINE)
        if varies:
            assert IGNORE_MARK.search(cell.source), (
                f"{path.name}: a cell using {varies.group(0)!r} must carry '# NBVAL_IGNORE_OUTPUT'")


def test_lesson_has_recipes_exercises_and_solutions(notebook):
    path, nb = notebook
    assert tagged(nb, "recipe"), f"{path.name}: no cell tagged 'recipe'"
    assert tagged(nb, "solution"), f"{path.name}: no cell tagged 'solution'"
    assert any("exercise" in c.source.lower() for c in nb.cells if c.cell_type == "markdown"), (
        f"{path.name}: no exercises section")


README = NOTEBOOK_DIR.parent / "README.md"
README_ROW = re.compile(r"^\|\s*\d\d\s*\|\s*\[`(\d\d_[a-z0-9_]+)\.ipynb`\].*\|\s*~\s*(\d+)\s*s\s*\|\s*$", re.MULTILINE)
FIRST_CELL_TIME = re.compile(r"run time\W*(?:about|~)\s*(\d+)\s*s\b", re.IGNORECASE)


def test_readme_run_times_agree_with_each_notebooks_first_cell():
    readme = dict((name, int(seconds)) for name, seconds in README_ROW.findall(README.read_text(encoding="utf-8")))
    assert set(readme) == {p.stem for p in NOTEBOOKS}, "README's learning-path table must list every notebook"
    stated = {}
    for path in NOTEBOOKS:
        found = FIRST_CELL_TIME.search(read(path).cells[0].source)
        assert found, f"{path.name}: the first cell does not state 'run time: about N s'"
        stated[path.stem] = int(found.group(1))
    disagree = {name: f"README ~{readme[name]} s, notebook about {stated[name]} s"
                for name in stated if readme[name] != stated[name]}
    assert not disagree, f"run times disagree: {disagree}"
