"""How long each lesson's core path takes in class: reading, running and its exercises (issue 20).

A lesson's core path is every cell before its first markdown heading that starts with "Going
further"; what follows is optional. For the core path the estimate adds:

- reading the markdown at READING_WPM words a minute. Adults read English non-fiction silently at
  about 238 words a minute (Brysbaert 2019, "How many words do we read per minute?", Journal of
  Memory and Language 109); a learner meeting technical text for the first time reads slower, and
  we take 180;
- reading the code at CODE_LINES_PER_MINUTE non-blank lines a minute (6 s a line; careful code
  review runs at under 500 lines an hour, about 8 a minute, and a lesson's code is explained by
  the prose around it);
- running the code cells, as nbclient timed them when the notebook was last executed (the
  `execution` timestamps `make notebooks` records in each cell; refresh them with
  `make notebooks NOTEBOOKS=...`; `benchmarks/notebook_times.py` times whole notebooks);
- EXERCISE_MINUTES for each exercise (an Otter `# BEGIN QUESTION` cell; in a lesson not yet in that
  format, each `solution` cell). An exercise's own cells (starter, solution, checks) are not counted
  as reading: the exercise time covers them.

Prints one row per lesson, marks core paths over the 50-minute class and lessons with no "Going
further" heading yet; exits 1 if a marked lesson's core path is over 50 minutes.
Run: `.venv/bin/python benchmarks/lesson_minutes.py [notebooks/NN_topic.ipynb ...]`.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat

from notebook_times import NOTEBOOK_DIR

READING_WPM = 180            # words of prose a minute, a learner's pace on technical text
CODE_LINES_PER_MINUTE = 10   # non-blank code lines a minute
EXERCISE_MINUTES = 6         # one exercise: read the prompt, write the answer, run its check
CLASS_MINUTES = 50           # one class

GOING_FURTHER = re.compile(r"^#{1,6}\s*Going further\b", re.IGNORECASE | re.MULTILINE)
WORD = re.compile(r"\S*\w\S*")
LINK_TARGET = re.compile(r"\]\([^)]*\)")          # [text](target): the target is not read
NOT_READ = re.compile(r"^\s*(#\s*NBVAL_IGNORE_OUTPUT|%)")


@dataclass(frozen=True)
class Estimate:
    """One lesson's core path: what it holds and how many minutes it takes in class."""

    words: int
    code_lines: int
    run_seconds: float
    exercises: int
    marked: bool    # has a "Going further" heading

    @property
    def minutes(self) -> float:
        return (self.words / READING_WPM + self.code_lines / CODE_LINES_PER_MINUTE
                + self.run_seconds / 60 + self.exercises * EXERCISE_MINUTES)


def core_cells(notebook) -> tuple[list, bool]:
    """The cells before the first "Going further" heading, and whether there is one."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown" and GOING_FURTHER.search(cell.source):
            return notebook.cells[:index], True
    return list(notebook.cells), False


def cell_seconds(cell) -> float:
    """The seconds a code cell ran when it was last executed, from nbclient's timestamps (0 if none)."""
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def marker(cell) -> str:
    """An Otter block marker of a raw cell ("BEGIN QUESTION", "END SOLUTION", ...), or ""."""
    if cell.cell_type != "raw":
        return ""
    found = re.match(r"\s*#\s*((?:BEGIN|END) (?:QUESTION|SOLUTION|TESTS|PROMPT))\b", cell.source)
    return found.group(1) if found else ""


def estimate(notebook) -> Estimate:
    """Words, code lines, run time and exercises of a notebook's core path."""
    cells, marked = core_cells(notebook)
    otter = any(marker(cell) == "BEGIN QUESTION" for cell in notebook.cells)
    words = code_lines = exercises = 0
    run_seconds = 0.0
    in_question = in_solution = False
    for cell in cells:
        mark = marker(cell)
        in_question = mark != "END QUESTION" and (in_question or mark == "BEGIN QUESTION")
        in_solution = mark != "END SOLUTION" and (in_solution or mark == "BEGIN SOLUTION")
        exercises += mark == "BEGIN QUESTION" or (not otter and "solution" in cell.metadata.get("tags", []))
        if cell.cell_type == "markdown" and not in_solution:
            words += len(WORD.findall(LINK_TARGET.sub("]", cell.source)))
        elif cell.cell_type == "code":
            run_seconds += cell_seconds(cell)
            if not in_question and "solution" not in cell.metadata.get("tags", []):
                code_lines += sum(1 for line in cell.source.splitlines() if line.strip() and not NOT_READ.match(line))
    return Estimate(words, code_lines, run_seconds, int(exercises), marked)


def main(paths: list[str]) -> int:
    notebooks = [Path(p) for p in paths] or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    print(f"core path = words / {READING_WPM} wpm + code lines / {CODE_LINES_PER_MINUTE} a minute "
          f"+ run time + {EXERCISE_MINUTES} min an exercise; a class is {CLASS_MINUTES} min")
    print(f"{'lesson':<30}{'words':>7}{'code':>6}{'run s':>7}{'exercises':>10}{'minutes':>9}  note")
    over = []
    for path in notebooks:
        found = estimate(nbformat.read(path, as_version=4))
        notes = []
        if found.minutes > CLASS_MINUTES:
            notes.append(f"OVER {CLASS_MINUTES}")
            if found.marked:
                over.append(path.name)
        if not found.marked:
            notes.append('no "Going further" yet: whole lesson counted')
        print(f"{path.name:<30}{found.words:>7}{found.code_lines:>6}{found.run_seconds:>7.1f}"
              f"{found.exercises:>10}{found.minutes:>9.0f}  {'; '.join(notes)}")
    if over:
        print(f"core path over {CLASS_MINUTES} min: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
