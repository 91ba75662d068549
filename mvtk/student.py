"""Student copies of the notebooks: outputs cleared, solutions replaced by a "your turn" cell.

Run as `python -m mvtk.student notebooks student` (`make student`); teachers hand out the
result (README, "Teaching with it"). Never edit a student copy by hand: regenerate it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from mvtk.errors import InvalidArgumentError
from mvtk.files import atomic_write

__all__ = ["SOLUTION_TAG", "PLACEHOLDER", "student_copy", "write_student_copies", "main"]

SOLUTION_TAG = "solution"
PLACEHOLDER = "# YOUR TURN: write your solution here, then compare with the teacher's copy.\n"


def student_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of `notebook` with every output cleared and each `solution` cell's code replaced (Lesson 00, §1)."""
    copy = nbformat.from_dict(notebook)
    for cell in copy.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            cell.source = PLACEHOLDER
            cell.metadata["tags"] = [t for t in cell.metadata["tags"] if t != SOLUTION_TAG] + ["your-turn"]
    copy.metadata.pop("widgets", None)
    return copy


def write_student_copies(source: str | Path, target: str | Path) -> list[Path]:
    """Write a student copy of every `NN_*.ipynb` in `source` to `target`; returns their paths (Lesson 00, §1)."""
    source, target = Path(source), Path(target)
    notebooks = sorted(source.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise InvalidArgumentError(f"no lesson notebooks (NN_topic.ipynb) in {str(source)!r}")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        out = target / path.name
        with atomic_write(out) as tmp:  # a reader never sees half a notebook
            nbformat.write(student_copy(nbformat.read(path, as_version=4)), tmp)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.student SOURCE TARGET` (`make student`): write the copies; 2 on bad input (Lesson 00, §1)."""
    parser = argparse.ArgumentParser(prog="python -m mvtk.student", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the lesson notebooks, e.g. notebooks")
    parser.add_argument("target", help="folder for the student copies, e.g. student")
    args = parser.parse_args(argv)
    try:
        written = write_student_copies(args.source, args.target)
    except InvalidArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} student notebooks to {args.target}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
