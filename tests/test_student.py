"""`make student` and `make grade` (issue 20): Otter Assign's release hides the solutions and keeps the checks;
graded, a correct answer passes and an untouched student copy fails, one CSV row per student and exercise.

Only the lessons already in Otter's format (a raw `# ASSIGNMENT CONFIG` first cell) are released and graded.
"""
from __future__ import annotations

import ast
import builtins
import csv
import os
import re
import subprocess
import tempfile
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml

from mvtk.classroom import CSV_COLUMNS, NO_CONTAINER, collect, grade_folder, main, normalise
from mvtk.errors import InvalidArgumentError
from notebook_utils import NOTEBOOKS, ROOT, code_cells, read, tagged

STAMP = ".venv/.installed-from-pyproject"
CONVERTED = [p for p in NOTEBOOKS if read(p).cells[0].cell_type == "raw"
             and read(p).cells[0].source.startswith("# ASSIGNMENT CONFIG")]
MARKERS = ("# BEGIN SOLUTION", "# END SOLUTION")
# Grading runs each submission's whole notebook, twice per lesson: by default only the short first lessons
# (00's exercises are the worked example); MVTK_GRADE_ALL=1 grades every converted lesson.
GRADED = [p for p in CONVERTED if os.environ.get("MVTK_GRADE_ALL") == "1" or p.stem in ("00_setup", "01_define")]


def make(*args: str) -> subprocess.CompletedProcess:
    """`make …` in the repository, never reinstalling the venv (`-o` the stamp), as a fresh make."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-o", STAMP, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def auto_checked(path: Path) -> list[str]:
    """The names of the notebook's Otter questions that have tests (not `manual: true`), in order."""
    configs = [yaml.safe_load(c.source) for c in read(path).cells
               if c.cell_type == "raw" and c.source.startswith("# BEGIN QUESTION")]
    return [config["name"] for config in configs if not config.get("manual")]


def answer_cells(notebook) -> list:
    return [c for c in code_cells(notebook) if "otter_answer_cell" in c.metadata.get("tags", [])]


def solution_lines(cell) -> tuple[list[str], set[str]]:
    """A teacher's solution cell's lines between its BEGIN/END SOLUTION markers, and those outside (stripped)."""
    inside, lines, outside = False, [], set()
    for line in cell.source.splitlines():
        if line.strip() in MARKERS:
            inside = line.strip() == MARKERS[0]
        elif line.strip():
            (lines.append if inside else outside.add)(line.strip())
    return lines, outside


@pytest.fixture(scope="module")
def release():
    """`make student` over a snapshot of the converted lessons (teacher/), into a temporary folder; the checks
    are not rerun against the solutions there (nbval runs them)."""
    if not CONVERTED:
        pytest.skip("no lesson has an ASSIGNMENT CONFIG cell yet")
    with tempfile.TemporaryDirectory(prefix="mvtk-release-") as name:
        folder = Path(name)
        (folder / "teacher").mkdir()
        before = {path.name: path.read_bytes() for path in CONVERTED}
        for file_name, data in before.items():
            (folder / "teacher" / file_name).write_bytes(data)
        result = make("student", f"NOTEBOOKS={' '.join(str(folder / 'teacher' / n) for n in before)}",
                      f"STUDENT={folder / 'student'}", f"AUTOGRADER={folder / 'autograder'}",
                      f"OTTER_BUILD={folder / 'build'}", "OTTER_ASSIGN_ARGS=--no-run-tests")
        assert result.returncode == 0, result.stdout + result.stderr
        after = {n: (folder / "teacher" / n).read_bytes() for n in before}
        assert after == before, "make student changed a teacher's notebook"
        yield folder


@pytest.fixture(params=CONVERTED, ids=[p.stem for p in CONVERTED])
def lesson(request, release):
    path = release / "teacher" / request.param.name
    return path, read(path), read(release / "student" / path.name)


def test_the_release_holds_one_student_notebook_and_one_autograder_per_lesson(release):
    assert sorted(p.name for p in (release / "student").iterdir()) == [p.name for p in CONVERTED]
    assert sorted(p.name for p in (release / "autograder").iterdir()) == [f"{p.stem}.zip" for p in CONVERTED]


def test_student_copies_keep_the_starter_code_but_not_the_solutions(lesson):
    path, teacher, student = lesson
    solutions, answers = tagged(teacher, "solution"), answer_cells(student)
    assert len(answers) == len(solutions), f"{path.name}: one answer cell per solution cell"
    for solution, answer in zip(solutions, answers):
        starter = "\n".join(line for line in solution.source.split(MARKERS[0])[0].splitlines()
                             if not re.match(r"\s*#\s*NBVAL_", line)).strip()  # the marker is the teacher's
        assert answer.source.startswith(starter), f"{path.name}: the starter code is kept"
        hidden, handed_out = solution_lines(solution)
        leaked = [line for line in hidden if line in {shown.strip() for shown in answer.source.splitlines()} - handed_out]
        assert not leaked, f"{path.name}: solution lines {leaked} are in the student copy"
    inside, model_answers = False, []
    for cell in teacher.cells:
        if cell.cell_type == "raw" and cell.source.strip() in MARKERS:
            inside = cell.source.strip() == MARKERS[0]
        elif inside and cell.cell_type == "markdown":
            model_answers.append(cell.source.strip())
    shown = [c.source.strip() for c in student.cells if c.cell_type == "markdown"]
    assert not set(model_answers) & set(shown), f"{path.name}: a written model answer is in the student copy"


def test_student_copies_keep_one_check_per_exercise_and_its_public_tests(lesson):
    path, _, student = lesson
    names = auto_checked(path)
    checks = [c.source for c in code_cells(student) if c.source.startswith("grader.check(")]
    assert checks == [f'grader.check("{name}")' for name in names]
    assert code_cells(student)[0].source.endswith(f'grader = otter.Notebook("{path.name}")')
    tests = student.metadata["otter"]["tests"]
    assert sorted(tests) == sorted(names) and all("hidden=False" in source for source in tests.values())


def names_a_check_reads_from_outside(source: str) -> dict[str, list[str]]:
    """For each `test_*` function in an Otter test cell: the names it reads that are not its parameters, its own
    locals or imports, or builtins. Otter runs a check in the test file's namespace and hands it only the notebook
    variables named as parameters, so any other name is a NameError for the student (nbval cannot see this: it
    runs the cell inside the notebook)."""
    tree = ast.parse(re.sub(r'^""" # BEGIN TEST CONFIG.*?""" # END TEST CONFIG\n', "", source, flags=re.S))
    found = {}
    for function in [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]:
        bound = {arg.arg for arg in ast.walk(function) if isinstance(arg, ast.arg)}
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node is not function:
                bound.add(node.name)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
        read_names = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        found[function.name] = sorted(read_names - bound - set(dir(builtins)))
    return found


@pytest.mark.parametrize("path", CONVERTED, ids=[p.stem for p in CONVERTED])
def test_every_check_takes_the_notebook_names_it_uses_as_parameters(path):
    inside, outside = False, {}
    for cell in read(path).cells:
        if cell.cell_type == "raw" and cell.source.strip() in ("# BEGIN TESTS", "# END TESTS"):
            inside = cell.source.strip() == "# BEGIN TESTS"
        elif inside and cell.cell_type == "code":
            outside.update({name: free for name, free in names_a_check_reads_from_outside(cell.source).items() if free})
    assert not outside, f"{path.name}: these checks read notebook names they do not take as parameters: {outside}"


def test_the_parameter_check_finds_a_name_read_from_outside():
    source = "def test_q1(answer):\n    import math\n    assert answer(model) == math.pi\n\ntest_q1(answer)"
    assert names_a_check_reads_from_outside(source) == {"test_q1": ["model"]}


def test_student_copies_carry_no_harness_markers_outputs_or_teacher_tags(lesson):
    path, _, student = lesson
    assert not [c for c in student.cells if c.cell_type == "raw"], f"{path.name}: Otter's raw cells are gone"
    for cell in student.cells:
        assert not re.search(r"^\s*#\s*NBVAL_|<!-- (BEGIN|END) QUESTION -->", cell.source, re.MULTILINE), cell.source
        assert "solution" not in cell.metadata.get("tags", []) and "execution" not in cell.metadata
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(student))
    assert not normalise(student), f"{path.name}: the student copy's kernel metadata is not what JupyterLab writes"


@pytest.mark.slow
def test_make_grade_passes_correct_answers_and_fails_untouched_copies(release):
    """One correct and one wrong submission per exercise: the teacher's solutions typed into the student copy
    (alice/NN_topic.ipynb), and the untouched student copy (bob_NN_topic.ipynb, the flat naming); an empty file
    (carol's) gets failing rows with a note, and the others are graded all the same."""
    submissions, graded = release / "submissions", [release / "teacher" / path.name for path in GRADED]
    (submissions / "alice").mkdir(parents=True)
    (submissions / f"carol_{graded[0].name}").write_bytes(b"")
    for path in graded:
        student = read(release / "student" / path.name)
        nbformat.write(student, submissions / f"bob_{path.name}")
        for solution, answer in zip(tagged(read(path), "solution"), answer_cells(student)):
            answer.source = "\n".join(l for l in solution.source.splitlines() if l.strip() not in MARKERS)
        nbformat.write(student, submissions / "alice" / path.name)
    grades = release / "grades.csv"
    result = make("grade", f"SUBMISSIONS={submissions}", f"AUTOGRADER={release / 'autograder'}", f"GRADES={grades}")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(grades, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = sorted(tuple(row.values()) for row in reader)
    unreadable = "could not read the notebook (NotJSONError): not graded"
    expected = sorted([(who, path.stem, name, passed, points, "false", note) for path in graded
                       for name in auto_checked(path)
                       for who, passed, points, note in (("alice", "true", "1", ""), ("bob", "false", "0", ""))]
                      + [("carol", graded[0].stem, name, "false", "0", "false", unreadable)
                         for name in auto_checked(graded[0])])
    assert rows == expected
    assert f"{len(graded) * 2 + 1} notebooks from 3 students" in result.stdout and NO_CONTAINER in result.stdout
    assert sorted(p.name for p in release.iterdir() if p.is_file()) == ["grades.csv"], "a temporary file was left"


def test_normalise_writes_the_kernelspec_jupyterlab_writes_once():
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    assert normalise(notebook) and not normalise(notebook)
    assert notebook.metadata.kernelspec.name == "python3" and notebook.nbformat_minor == 5


def test_collect_without_otter_output_fails_clearly(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no Otter Assign output"):
        collect(tmp_path, tmp_path / "student", tmp_path / "autograder")


def test_grading_fails_clearly_on_bad_input(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        grade_folder(tmp_path / "missing", tmp_path, tmp_path / "grades.csv")
    with pytest.raises(InvalidArgumentError, match="run `make student` first"):
        grade_folder(tmp_path, tmp_path, tmp_path / "grades.csv")
    (tmp_path / "autograder").mkdir()
    (tmp_path / "autograder" / "00_setup.zip").write_bytes(b"")
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "homework.ipynb").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="no submitted notebooks .* matches no lesson"):
        grade_folder(tmp_path / "alice", tmp_path / "autograder", tmp_path / "grades.csv")
    (tmp_path / "alice" / "00_setup.ipynb").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="not a readable zip"):
        grade_folder(tmp_path, tmp_path / "autograder", tmp_path / "grades.csv")
    assert not (tmp_path / "grades.csv").exists()


def submissions_folder(release: Path, tmp_path: Path) -> Path:
    """An empty submissions folder and a copy of lesson 00's autograder beside it."""
    (tmp_path / "autograder").mkdir()
    (tmp_path / "autograder" / "00_setup.zip").write_bytes((release / "autograder" / "00_setup.zip").read_bytes())
    (tmp_path / "returned").mkdir()
    return tmp_path / "returned"


def read_grades(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_unreadable_misnamed_and_linked_files_do_not_stop_the_class(release, tmp_path, capsys):
    """Nothing here is run: an empty and a broken notebook get failing rows with a note (a name that a spreadsheet
    would run as a formula is written as text), a misnamed file and a linked folder are skipped with a warning."""
    returned = submissions_folder(release, tmp_path)
    (returned / "carol_00_setup.ipynb").write_bytes(b"")
    (returned / "=HYPERLINK(1)").mkdir()
    (returned / "=HYPERLINK(1)" / "00_setup.ipynb").write_text('{"cells": [')
    (returned / "gina").mkdir()
    (returned / "gina" / "my homework.ipynb").write_text("{}")
    (returned / "linked").symlink_to(returned / "gina")
    assert main(["grade", str(returned), str(tmp_path / "autograder"), str(tmp_path / "grades.csv")]) == 0
    rows = read_grades(tmp_path / "grades.csv")
    assert {row["student"] for row in rows} == {"carol", "'=HYPERLINK(1)"}
    assert [row["exercise"] for row in rows] == auto_checked(release / "teacher" / "00_setup.ipynb") * 2
    assert all(row["passed"] == "false" and row["points"] == "0" and row["flagged"] == "false"
               and row["note"].startswith("could not read the notebook") for row in rows)
    out, err = capsys.readouterr()
    assert "2 notebooks from 2 students: 0 of 4 exercises passed" in out
    assert "skipped 2 files" in out and "my homework.ipynb" in out and str(returned / "linked") in out
    assert "symbolic link" in err and "matches no lesson" in err and NO_CONTAINER in out


def test_one_unreadable_notebook_is_counted_in_the_singular(release, tmp_path, capsys):
    returned = submissions_folder(release, tmp_path)
    (returned / "carol_00_setup.ipynb").write_text("not a notebook")
    assert main(["grade", str(returned), str(tmp_path / "autograder"), str(tmp_path / "grades.csv")]) == 0
    assert "1 notebook from 1 student: 0 of 2 exercises passed" in capsys.readouterr().out


def test_two_submissions_for_one_student_and_lesson_are_refused_before_grading(release, tmp_path):
    returned = submissions_folder(release, tmp_path)
    (returned / "dup").mkdir()
    for path in (returned / "dup" / "00_setup.ipynb", returned / "dup_00_setup.ipynb"):
        nbformat.write(read(release / "student" / "00_setup.ipynb"), path)
    with pytest.raises(InvalidArgumentError, match="two submissions of 00_setup for 'dup'") as refused:
        grade_folder(returned, tmp_path / "autograder", tmp_path / "grades.csv")
    assert "dup/00_setup.ipynb" in str(refused.value) and "dup_00_setup.ipynb" in str(refused.value)
    assert not (tmp_path / "grades.csv").exists()


CHEAT = """import otter.test_files.exception_test as runner
def always_passes(self, global_environment):
    self.passed = True
runner.ExceptionTestFile.run = always_passes
def seeded_twice():
    return None"""


@pytest.mark.slow
def test_a_cheat_is_flagged_and_an_endless_answer_is_stopped_and_cleaned_up(release, tmp_path, monkeypatch):
    """Mallory patches Otter's test runner (it works without a container: she is flagged for review); Trudy's
    answer never ends: her notebook is stopped at the time limit, its kernel killed, its temporary files gone."""
    returned = submissions_folder(release, tmp_path)
    init = code_cells(read(release / "student" / "00_setup.ipynb"))[0].source
    for student, answer in (("mallory", CHEAT), ("trudy", "while True:\n    pass")):
        (returned / student).mkdir()
        cells = [nbformat.v4.new_code_cell(init), nbformat.v4.new_code_cell(answer)]
        nbformat.write(nbformat.v4.new_notebook(cells=cells), returned / student / "00_setup.ipynb")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rows, skipped = grade_folder(returned, tmp_path / "autograder", tmp_path / "grades.csv", timeout=12)
    assert not skipped and rows == read_grades(tmp_path / "grades.csv")
    flagged = {row["student"] for row in rows if row["flagged"] == "true"}
    assert flagged == {"mallory"}
    assert all("ExceptionTestFile" in row["note"] for row in rows if row["student"] == "mallory")
    trudy = [row for row in rows if row["student"] == "trudy"]
    assert [row["exercise"] for row in trudy] == auto_checked(release / "teacher" / "00_setup.ipynb")
    assert all(row["passed"] == "false" and row["points"] == "0" and "timed out after 12 s" in row["note"]
               for row in trudy)
    assert not list(scratch.iterdir()), "a grading process left temporary files"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(scratch) in " ".join(p.info["cmdline"] or [])]
    assert not left, "a grading kernel is still running"


def test_make_grade_without_a_folder_says_how_to_call_it(capsys):
    assert main(["grade", "", "autograder", "grades.csv"]) == 2
    assert "make grade SUBMISSIONS=folder" in capsys.readouterr().err
