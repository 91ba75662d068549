"""The classroom glue around Otter-Grader (issue 20): tidy the student release, grade a folder into one CSV.

`make student` runs `otter assign` on every lesson with an `# ASSIGNMENT CONFIG` cell, then
`python -m mvtk.classroom collect` gathers the student notebooks into `student/` and the autograder
zips into `autograder/`; `make grade` runs `python -m mvtk.classroom grade`, which grades each
submission with `otter run`'s API (no container: the course's own environment) into one CSV.
`python -m mvtk.classroom normalise` gives notebooks the kernel metadata JupyterLab writes, so they
open unmodified. Lesson 00, §1 shows the exercise format; README, "Teaching with mvtk", the commands.
"""
from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager

from mvtk.errors import InvalidArgumentError
from mvtk.files import atomic_write

__all__ = ["CSV_COLUMNS", "normalise", "student_notebook", "collect", "grade_folder", "main"]

CSV_COLUMNS = ["student", "lesson", "exercise", "passed", "points"]
KERNEL = "python3"
LESSON = re.compile(r"\d\d_[a-z0-9_]+")
# Lines meant for the teacher's tools, not for students: nbval's marker and Otter's PDF-export comments.
HARNESS_LINE = re.compile(r"^\s*(#\s*NBVAL_\w+|<!-- (BEGIN|END) QUESTION -->)\s*$")


def normalise(notebook: nbformat.NotebookNode) -> bool:
    """Give `notebook` the kernelspec and format JupyterLab writes, so it opens unmodified; True if changed (Lesson 00, §1)."""
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    wanted = {"display_name": spec.display_name, "language": spec.language, "name": KERNEL}
    changed = notebook.metadata.get("kernelspec") != wanted or notebook.nbformat_minor < 5
    notebook.metadata["kernelspec"] = wanted
    if notebook.nbformat_minor < 5:
        notebook.nbformat_minor = 5
        nbformat.validator.normalize(notebook)  # adds the cell ids nbformat 4.5 requires
    return changed


def student_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Otter's student notebook without the teacher's markers, run timings and widget state (Lesson 00, §1)."""
    copy = nbformat.from_dict(notebook)
    cells = []
    for cell in copy.cells:
        cell.source = "\n".join(line for line in cell.source.split("\n") if not HARNESS_LINE.match(line)).strip("\n")
        cell.metadata.pop("execution", None)
        if "tags" in cell.metadata:
            cell.metadata["tags"] = [tag for tag in cell.metadata["tags"] if tag != "solution"]
            if not cell.metadata["tags"]:
                del cell.metadata["tags"]
        if cell.source or cell.cell_type == "code":
            cells.append(cell)
    copy.cells = cells
    copy.metadata.pop("widgets", None)
    normalise(copy)
    return copy


def collect(build: str | Path, student: str | Path, autograder: str | Path) -> list[str]:
    """Gather `otter assign`'s outputs in `build/NN_topic/` into `student/` and `autograder/NN_topic.zip`; returns the lessons (Lesson 00, §1)."""
    build, student, autograder = Path(build), Path(student), Path(autograder)
    lessons = sorted(p.name for p in build.glob("[0-9][0-9]_*") if (p / "student" / f"{p.name}.ipynb").is_file())
    if not lessons:
        raise InvalidArgumentError(f"no Otter Assign output (NN_topic/student/NN_topic.ipynb) in {str(build)!r}: "
                                   "does any notebook start with a raw '# ASSIGNMENT CONFIG' cell?")
    for lesson in lessons:
        zips = sorted((build / lesson / "autograder").glob(f"{lesson}-autograder_*.zip"))
        if len(zips) != 1:
            raise InvalidArgumentError(f"expected one autograder zip in {str(build / lesson / 'autograder')!r}, found "
                                       f"{len(zips)}: is 'generate' set in the ASSIGNMENT CONFIG cell?")
        released = student_notebook(nbformat.read(build / lesson / "student" / f"{lesson}.ipynb", as_version=4))
        with atomic_write(student / f"{lesson}.ipynb") as tmp:  # a reader never sees half a notebook
            nbformat.write(released, tmp)
        with atomic_write(autograder / f"{lesson}.zip") as tmp:
            shutil.copyfile(zips[0], tmp)
    return lessons


def _submissions(folder: Path, lessons: list[str]) -> list[tuple[str, str, Path]]:
    """(student, lesson, path) for each notebook below `folder`: `alice/00_setup.ipynb` or `alice_00_setup.ipynb`."""
    found = []
    for path in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        lesson = next((name for name in lessons if path.stem.endswith(name)), None)
        if lesson is None:
            raise InvalidArgumentError(f"submission {str(path)!r} matches no lesson with an autograder; "
                                       f"expected a name ending in one of {lessons} (run `make student` first?)")
        relative = path.relative_to(folder)
        student = relative.parts[0] if len(relative.parts) > 1 else path.stem[: -len(lesson)].rstrip("_- ")
        if not student:
            raise InvalidArgumentError(f"cannot tell whose submission {str(path)!r} is: put it in a folder named "
                                       f"after the student, or name it <student>_{lesson}.ipynb")
        found.append((student, lesson, path))
    return found


def grade_folder(folder: str | Path, autograder: str | Path, csv_path: str | Path) -> list[dict]:
    """Grade every submission below `folder` with `autograder/NN_topic.zip`, in this environment (no container),
    into `csv_path`, one row per student and exercise; returns the rows (Lesson 00, §1)."""
    from otter.api import grade_submission

    folder, autograder = Path(folder), Path(autograder)
    if not folder.is_dir():
        raise InvalidArgumentError(f"submissions folder {str(folder)!r} does not exist; expected a folder of notebooks")
    lessons = sorted(p.stem for p in autograder.glob("[0-9][0-9]_*.zip"))
    if not lessons:
        raise InvalidArgumentError(f"no autograder zips (NN_topic.zip) in {str(autograder)!r}: run `make student` first")
    found = _submissions(folder, lessons)
    if not found:
        raise InvalidArgumentError(f"no submitted notebooks (*.ipynb) below {str(folder)!r}")
    rows = []
    for student, lesson, path in found:
        results = grade_submission(str(path), str(autograder / f"{lesson}.zip"), quiet=True)
        for name in sorted(results.results, key=lambda q: int(q[1:]) if q[1:].isdigit() else q):
            result = results.results[name]
            rows.append({"student": student, "lesson": lesson, "exercise": name,
                         "passed": str(result.passed_all).lower(), "points": f"{result.score:g}"})
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.classroom normalise|collect|grade …` (Makefile); 2 on bad input (Lesson 00, §1)."""
    parser = argparse.ArgumentParser(prog="python -m mvtk.classroom", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("normalise", help="give notebooks the kernel metadata JupyterLab writes")
    command.add_argument("notebooks", nargs="+")
    command = commands.add_parser("collect", help="gather otter assign's outputs into the release folders")
    command.add_argument("build", help="folder of otter assign outputs, one NN_topic/ per lesson")
    command.add_argument("student", help="folder for the student notebooks, e.g. student")
    command.add_argument("autograder", help="folder for the autograder zips, e.g. autograder")
    command = commands.add_parser("grade", help="grade a folder of submissions into one CSV")
    command.add_argument("submissions", help="folder of submitted notebooks, e.g. one subfolder per student")
    command.add_argument("autograder", help="folder of autograder zips written by `make student`")
    command.add_argument("csv", help="the CSV to write: student, lesson, exercise, passed, points")
    args = parser.parse_args(argv)
    try:
        if args.command == "normalise":
            for path in args.notebooks:
                notebook = nbformat.read(path, as_version=4)
                if normalise(notebook):
                    with atomic_write(path) as tmp:
                        nbformat.write(notebook, tmp)
                    print(f"normalised {path}")
        elif args.command == "collect":
            lessons = collect(args.build, args.student, args.autograder)
            print(f"student release: {len(lessons)} notebooks in {args.student}/, autograders in {args.autograder}/")
        else:
            if not args.submissions:
                raise InvalidArgumentError("no submissions folder given: make grade SUBMISSIONS=folder")
            rows = grade_folder(args.submissions, args.autograder, args.csv)
            passed = sum(row["passed"] == "true" for row in rows)
            print(f"graded {len({(r['student'], r['lesson']) for r in rows})} submissions: {passed} of {len(rows)} "
                  f"exercises passed; wrote {args.csv}")
    except InvalidArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
