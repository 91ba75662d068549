"""Every lesson notebook follows the anatomy of design.md §2-§3, so nbval and learners can rely on it."""
import ast
import re

import pytest
import yaml

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


ASSIGNMENT_CONFIG = re.compile(r"#\s+ASSIGNMENT\s+CONFIG", re.IGNORECASE)
BOUNDARY = re.compile(r"#\s+(BEGIN|END)\s+(QUESTION|SOLUTION|TESTS|PROMPT)\b", re.IGNORECASE)
TEST_CONFIG = re.compile(r'^""" # BEGIN TEST CONFIG\n(.*?)\n""" # END TEST CONFIG\n', re.DOTALL)
EXAMPLE = NOTEBOOK_DIR / "00_setup.ipynb"  # the worked example of the exercise format (issue 20)


def lesson_cells(nb) -> list:
    """The notebook's cells after its Otter `# ASSIGNMENT CONFIG` raw cell, if it has one."""
    cells = nb.cells
    if cells and cells[0].cell_type == "raw" and ASSIGNMENT_CONFIG.match(cells[0].source):
        return cells[1:]
    return cells


def questions(nb) -> list[dict]:
    """Each `# BEGIN QUESTION` … `# END QUESTION` block: its yaml config, and its cells outside a block
    ("prompt"), inside `# BEGIN SOLUTION` ("SOLUTION") and inside `# BEGIN TESTS` ("TESTS")."""
    found, question, block = [], None, None
    for cell in nb.cells:
        boundary = BOUNDARY.match(cell.source) if cell.cell_type == "raw" else None
        if boundary:
            begin, kind = boundary.group(1).upper() == "BEGIN", boundary.group(2).upper()
            if kind == "QUESTION":
                question = {"config": yaml.safe_load(cell.source) or {}, "prompt": [], "SOLUTION": [],
                            "TESTS": [], "PROMPT": []} if begin else None
                found += [question] if begin else []
            else:
                block = kind if begin else None
            continue
        if question is not None:
            question[block or "prompt"].append(cell)
    return found


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return request.param, read(request.param)


def test_first_cell_states_title_objectives_prerequisites_and_run_time(notebook):
    path, nb = notebook
    first = lesson_cells(nb)[0]
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


def test_the_assignment_config_cell_is_first_and_the_same_in_every_lesson(notebook):
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "raw" and ASSIGNMENT_CONFIG.match(first.source), (
        f"{path.name}: the first cell must be Otter's raw '# ASSIGNMENT CONFIG' cell (copy it from {EXAMPLE.name})")
    assert first.source == read(EXAMPLE).cells[0].source, (
        f"{path.name}: the ASSIGNMENT CONFIG cell differs from {EXAMPLE.name}'s; copy that one unchanged")


def test_exercises_are_numbered_otter_questions(notebook):
    path, nb = notebook
    found = questions(nb)
    assert found, f"{path.name}: no exercise in Otter's format (raw '# BEGIN QUESTION' cells; see {EXAMPLE.name})"
    for number, question in enumerate(found, start=1):
        where = f"{path.name}, exercise {number}"
        assert question["config"].get("name") == f"q{number}", f"{where}: its BEGIN QUESTION needs name: q{number}"
        assert question["config"].get("points") == 1, f"{where}: its BEGIN QUESTION needs points: 1"
        prompts = [c for c in question["prompt"] if c.cell_type == "markdown"]
        assert prompts and prompts[0].source.startswith(f"**Exercise {number}.**"), (
            f"{where}: the first markdown cell of the question must start with '**Exercise {number}.**'")
        assert question["SOLUTION"], f"{where}: no '# BEGIN SOLUTION' … '# END SOLUTION' block"


def test_open_questions_have_a_written_model_answer(notebook):
    path, nb = notebook
    for question in questions(nb):
        if question["config"].get("manual"):
            where = f"{path.name}, {question['config'].get('name')}"
            assert any(c.cell_type == "markdown" and c.source.strip() for c in question["SOLUTION"]), (
                f"{where}: a manual question's SOLUTION block holds a markdown model answer")
            assert not question["TESTS"], f"{where}: a manual question has no tests (it is read, not run)"


def test_auto_checked_exercises_have_starter_code_and_checks_with_a_hint(notebook):
    path, nb = notebook
    for question in questions(nb):
        if question["config"].get("manual"):
            continue
        where = f"{path.name}, {question['config'].get('name')}"
        for cell in question["SOLUTION"]:
            assert cell.cell_type == "code" and "solution" in cell.metadata.get("tags", []), (
                f"{where}: each solution cell is a code cell tagged 'solution'")
            lines = cell.source.splitlines()
            begins = [i for i, line in enumerate(lines) if line.strip() == "# BEGIN SOLUTION"]
            assert begins and any(line.strip() == "# END SOLUTION" for line in lines), (
                f"{where}: the solution cell marks the answer with '# BEGIN SOLUTION' … '# END SOLUTION' lines")
            assert any(line.strip() for line in lines[: begins[0]]), (
                f"{where}: keep the starter code (imports, the signature) above '# BEGIN SOLUTION'")
        assert question["TESTS"], f"{where}: an auto-checked exercise needs test cells in '# BEGIN TESTS'"
        for cell in question["TESTS"]:
            config = TEST_CONFIG.match(cell.source)
            assert cell.cell_type == "code" and config, (
                f"{where}: a test cell starts with the '\"\"\" # BEGIN TEST CONFIG' docstring (see {EXAMPLE.name})")
            settings = yaml.safe_load(config.group(1)) or {}
            assert settings.get("hidden") is False, f"{where}: test cells say 'hidden: false'"
            assert str(settings.get("failure_message") or "").strip(), f"{where}: a test cell gives a failure_message hint"
            body = ast.parse(cell.source[config.end():]).body
            assert (len(body) == 2 and isinstance(body[0], ast.FunctionDef) and body[0].name.startswith("test_")
                    and ast.unparse(body[1]).startswith(f"{body[0].name}(")), (
                f"{where}: after its config a test cell holds one `def test_…(names it checks)` and its call "
                "(Otter's exception-based tests)")


def test_solution_cells_sit_inside_a_question(notebook):
    path, nb = notebook
    inside = {id(cell) for question in questions(nb) for cell in question["SOLUTION"]}
    stray = [i for i, cell in enumerate(nb.cells, start=1)
             if "solution" in cell.metadata.get("tags", []) and id(cell) not in inside]
    assert not stray, f"{path.name}: cells {stray} are tagged 'solution' outside a SOLUTION block (students would see them)"


README = NOTEBOOK_DIR.parent / "README.md"
README_ROW = re.compile(r"^\|\s*\d\d\s*\|\s*\[`(\d\d_[a-z0-9_]+)\.ipynb`\].*\|\s*~\s*(\d+)\s*s\s*\|\s*$", re.MULTILINE)
FIRST_CELL_TIME = re.compile(r"run time\W*(?:about|~)\s*(\d+)\s*s\b", re.IGNORECASE)


def test_readme_run_times_agree_with_each_notebooks_first_cell():
    readme = dict((name, int(seconds)) for name, seconds in README_ROW.findall(README.read_text(encoding="utf-8")))
    assert set(readme) == {p.stem for p in NOTEBOOKS}, "README's learning-path table must list every notebook"
    stated = {}
    for path in NOTEBOOKS:
        found = FIRST_CELL_TIME.search(lesson_cells(read(path))[0].source)
        assert found, f"{path.name}: the first cell does not state 'run time: about N s'"
        stated[path.stem] = int(found.group(1))
    disagree = {name: f"README ~{readme[name]} s, notebook about {stated[name]} s"
                for name in stated if readme[name] != stated[name]}
    assert not disagree, f"run times disagree: {disagree}"
