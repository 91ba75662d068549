"""Docstrings point learners to the lesson section that uses a helper: "Lesson NN, §k" must name a real `## k.` heading."""
from __future__ import annotations

import ast
import re

import pytest

from notebook_utils import NOTEBOOK_DIR, ROOT, read

# "Lesson 02, §5", "Lesson 07 §1", "Lesson 03, §2, §4", "Lesson 02, §5-§8" (a range: every section in it)
REFERENCE = re.compile(r"Lesson (\d\d),?\s*(§\d+(?:\s*(?:,|-|–|and)\s*§\d+)*)")
SECTION = re.compile(r"§(\d+)(?:\s*[-–]\s*§(\d+))?")


def public_docstrings():
    """(where, docstring) for every module, public function, public class and its public methods in mvtk/ (packages too)."""
    for path in sorted((ROOT / "mvtk").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parts = path.relative_to(ROOT / "mvtk").with_suffix("").parts  # a package's files: checkpoint.core
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "mvtk"
        yield module, ast.get_docstring(tree) or ""
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                yield f"{module}.{node.name}", ast.get_docstring(node) or ""
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                            yield f"{module}.{node.name}.{item.name}", ast.get_docstring(item) or ""


def references():
    found = []
    for where, doc in public_docstrings():
        for match in REFERENCE.finditer(doc):
            lesson = match.group(1)
            for start, stop in SECTION.findall(match.group(2)):
                for section in range(int(start), int(stop or start) + 1):
                    found.append((where, lesson, section))
    return found


def headings(lesson: str) -> set[int]:
    notebooks = sorted(NOTEBOOK_DIR.glob(f"{lesson}_*.ipynb"))
    if not notebooks:
        return set()
    numbers = set()
    for cell in read(notebooks[0]).cells:
        if cell.cell_type == "markdown":
            numbers.update(int(n) for n in re.findall(r"^## (\d+)[. ]", cell.source, re.MULTILINE))
    return numbers


REFERENCES = references()


def test_docstrings_do_refer_to_lesson_sections():
    assert len(REFERENCES) > 50, "the section references were not found: has the 'Lesson NN, §k' form changed?"


@pytest.mark.parametrize("where, lesson, section", REFERENCES,
                         ids=[f"{w}-L{l}-s{s}" for w, l, s in REFERENCES])
def test_lesson_section_in_a_docstring_exists(where, lesson, section):
    available = headings(lesson)
    assert available, f"{where}: refers to Lesson {lesson}, but there is no notebooks/{lesson}_*.ipynb"
    assert section in available, (
        f"{where}: refers to Lesson {lesson}, §{section}, but that notebook's '## k.' sections are {sorted(available)}")
