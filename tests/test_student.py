"""`make student` writes student copies: outputs cleared, solutions replaced, nothing else changed."""
import subprocess
import sys

import nbformat
import pytest

from mvtk.errors import InvalidArgumentError
from mvtk.student import PLACEHOLDER, student_copy, write_student_copies
from notebook_utils import NOTEBOOK_DIR, NOTEBOOKS, ROOT, code_cells, read, tagged


def test_student_copy_clears_outputs_and_hides_solutions():
    for path in NOTEBOOKS:
        original = read(path)
        copy = student_copy(original)
        assert len(copy.cells) == len(original.cells)
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells(copy))
        solutions = tagged(original, "solution")
        assert solutions, f"{path.name} has no solution cells"
        hidden = [c for c in code_cells(copy) if "your-turn" in c.metadata.get("tags", [])]
        assert len(hidden) == len(solutions) and all(c.source == PLACEHOLDER for c in hidden)
        for before, after in zip(original.cells, copy.cells):
            if "solution" not in before.metadata.get("tags", []):
                assert before.source == after.source


def test_student_copy_leaves_the_teacher_notebook_untouched():
    original = read(NOTEBOOKS[0])
    snapshot = nbformat.writes(original)
    student_copy(original)
    assert nbformat.writes(original) == snapshot


def test_make_student_writes_every_notebook(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mvtk.student", str(NOTEBOOK_DIR), str(tmp_path / "student")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "student").glob("*.ipynb"))
    assert written == [p.name for p in NOTEBOOKS]
    assert not list((tmp_path / "student").glob("*.tmp"))


def test_student_copies_from_a_folder_without_notebooks_fail_clearly(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no lesson notebooks"):
        write_student_copies(tmp_path, tmp_path / "out")
