"""The classroom glue around Otter-Grader (issue 20): tidy the student release, grade a folder into one CSV.

`make student` runs `otter assign` on every lesson with an `# ASSIGNMENT CONFIG` cell, then
`python -m mvtk.classroom collect` gathers the student notebooks into `student/` and the autograder
zips into `autograder/`; `make grade` runs `python -m mvtk.classroom grade`, which grades each
submission with `otter run`'s API (no container: the course's own environment), each in a fresh process
stopped after `TIMEOUT` seconds, into one CSV; code that reaches into the grader is flagged for review, an
unreadable or timed-out notebook gets failing rows with a note. No container means no security: see NO_CONTAINER.
`python -m mvtk.classroom normalise` gives notebooks the kernel metadata JupyterLab writes, so they
open unmodified. Lesson 00, §1 shows the exercise format; README, "Teaching with mvtk", the commands.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import nbformat
from jupyter_client.kernelspec import KernelSpecManager

from mvtk.errors import InvalidArgumentError
from mvtk.files import atomic_write

__all__ = ["CSV_COLUMNS", "DEFAULT_TIMEOUT", "NO_CONTAINER", "normalise", "student_notebook", "collect", "plural",
           "grade_folder", "main"]

CSV_COLUMNS = ["student", "lesson", "exercise", "passed", "points", "flagged", "note"]
DEFAULT_TIMEOUT = 600  # seconds per submission (`make grade TIMEOUT=`)
NO_CONTAINER = ("no-container grading runs each submission's code as you, in the same process as its checks: a "
                "student who knows Python can fake a pass or read your files. Use it for formative feedback; for "
                "marks that count, grade with Otter's Docker container (`otter grade`) or review flagged submissions.")
# The grader lines a student copy hands out (Otter's init and check cells); any other mention of the grader is flagged.
PROVIDED = re.compile(r"""\s*(import otter|grader = otter\.Notebook\((["'])[\w.-]+\2\)|grader\.check\((["'])\w+\3\)"""
                      r"|grader\.check_all\(\))\s*")
# Code that reaches into the grader or around it: patching Otter's test runner, a result whose `==` always says
# True, the import machinery, shell commands. A heuristic for a teacher's review, not a proof.
SUSPICIOUS = re.compile(r"otter|grader|ExceptionTestFile|test_files|sys\.modules|builtins|__(eq|ne|hash|class|import|"
                        r"code|globals)__|importlib|ctypes|subprocess|os\.system|(?<![\w.])(exec|eval|compile)\s*\(|"
                        r"^\s*!|%%?(system|sx|bash|sh|script)\b")
HANDOUT = "mvtk_handout.json"  # in each autograder zip: the student copy's code lines, which are never flagged
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a field starting so as a formula
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
            with zipfile.ZipFile(tmp, "a") as archive:  # Otter ignores a file it does not know
                archive.writestr(HANDOUT, json.dumps(sorted(_code_lines(released))))
    return lessons


def plural(count: int, noun: str) -> str:
    """`1 notebook`, `2 notebooks`: a count for the classroom commands' summaries (Lesson 00, §1)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _question_order(name: str) -> tuple:
    """q2 before q10: Otter's question names in numeric order."""
    return (0, int(name[1:]), "") if name[1:].isdigit() else (1, 0, name)


def _code_lines(notebook: nbformat.NotebookNode) -> set[str]:
    """The stripped, non-blank lines of a notebook's code cells."""
    return {line.strip() for cell in notebook.cells if cell.cell_type == "code"
            for line in str(cell.source).splitlines() if line.strip()}


def _autograder(autograder: Path) -> tuple[list[str], set[str]]:
    """The question names an autograder zip has tests for (`tests/qN.py`), in order, and the handed-out code lines."""
    try:
        with zipfile.ZipFile(autograder) as archive:
            names = [PurePosixPath(n).stem for n in archive.namelist() if re.fullmatch(r"tests/[^/]+\.py", n)]
            handout = set(json.loads(archive.read(HANDOUT))) if HANDOUT in archive.namelist() else set()
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(f"autograder {str(autograder)!r} is not a readable zip ({exc}): "
                                   "run `make student` again") from exc
    return sorted(names, key=_question_order), handout


def _submissions(folder: Path, lessons: list[str]) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """(student, lesson, path) for each notebook below `folder` (`alice/00_setup.ipynb` or `alice_00_setup.ipynb`),
    and the files and links skipped, each with why; two notebooks for one student and lesson are refused."""
    found, skipped = [], []
    for top, folders, files in os.walk(folder):  # never follows a link: a submission is a real file in the folder
        here = Path(top)
        for name in sorted(folders):
            if (here / name).is_symlink():
                skipped.append(f"{here / name}: a symbolic link, not followed (copy the folder in instead)")
        folders[:] = sorted(name for name in folders if name != ".ipynb_checkpoints" and not (here / name).is_symlink())
        for name in sorted(files):
            path = here / name
            if not name.endswith(".ipynb"):
                continue
            if path.is_symlink():
                skipped.append(f"{path}: a symbolic link, not followed (copy the file in instead)")
                continue
            lesson = next((lesson for lesson in lessons if path.stem.endswith(lesson)), None)
            relative = path.relative_to(folder)
            student = None
            if lesson is not None:
                student = relative.parts[0] if len(relative.parts) > 1 else path.stem[: -len(lesson)].rstrip("_- ")
            if lesson is None:
                skipped.append(f"{path}: matches no lesson with an autograder; expected a name ending in one of "
                               f"{lessons} (run `make student` first?)")
            elif not student:
                skipped.append(f"{path}: cannot tell whose submission it is; put it in a folder named after the "
                               f"student, or name it <student>_{lesson}.ipynb")
            else:
                found.append((student, lesson, path))
    seen: dict[tuple[str, str], Path] = {}
    for student, lesson, path in found:
        if (student, lesson) in seen:
            raise InvalidArgumentError(f"two submissions of {lesson} for {student!r}: {str(seen[student, lesson])!r} "
                                       f"and {str(path)!r}; keep one and grade again")
        seen[student, lesson] = path
    return found, skipped


def _suspicious(notebook: nbformat.NotebookNode, handout: set[str]) -> list[str]:
    """What a notebook's code, beyond the lines handed out with it, says that reaches into the grader."""
    terms = []
    for line in sorted(_code_lines(notebook) - handout):
        if not PROVIDED.fullmatch(line):
            terms += [match.group(0).strip() for match in SUSPICIOUS.finditer(line)]
    return sorted(set(terms))


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill a grading process and everything it started: its kernel runs in a session of its own."""
    import psutil  # ipykernel's dependency, so always installed alongside otter

    try:
        parent = psutil.Process(process.pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def _grade_isolated(path: Path, autograder: Path, timeout: float) -> tuple[dict, str]:
    """Grade one submission in a fresh process (so one student's code cannot change how the next is graded),
    killed with its kernel after `timeout` seconds; ({question: (passed, score)}, note on failure)."""
    with tempfile.TemporaryDirectory(prefix="mvtk-grade-", ignore_cleanup_errors=True) as scratch:
        out = Path(scratch) / "results.json"  # otter's temporary files and the kernel's connection file go here too
        env = dict(os.environ, TMPDIR=scratch, JUPYTER_RUNTIME_DIR=str(Path(scratch) / "runtime"))
        process = subprocess.Popen([sys.executable, "-m", "mvtk.classroom", "grade-one", str(path), str(autograder),
                                    str(out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            process.communicate()
            return {}, f"timed out after {timeout:g} s (the limit, make grade TIMEOUT=): not graded"
        if process.returncode or not out.is_file():
            last = (err.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
            return {}, f"grading failed: {last}"
        return {name: tuple(value) for name, value in json.loads(out.read_text()).items()}, ""


def _grade_one(path: str, autograder: str, out: str) -> None:
    """Grade one notebook with otter (the child process of `_grade_isolated`) into a JSON file."""
    from otter.api import grade_submission

    results = grade_submission(path, autograder, quiet=True)
    scores = {name: (bool(r.passed_all), float(r.score)) for name, r in results.results.items()}
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(scores))


def _safe(text: str) -> str:
    """A CSV field a spreadsheet shows as text, never runs as a formula (OWASP: prefix `'`)."""
    return f"'{text}" if text[:1] in FORMULA_START else text


def grade_folder(folder: str | Path, autograder: str | Path, csv_path: str | Path,
                 timeout: float = DEFAULT_TIMEOUT) -> tuple[list[dict], list[str]]:
    """Grade every submission below `folder` with `autograder/NN_topic.zip`, each in a fresh process limited to
    `timeout` seconds, in this environment (no container), into `csv_path`, one row per student and exercise;
    returns the rows and the files skipped (Lesson 00, §1)."""
    folder, autograder = Path(folder), Path(autograder)
    if not folder.is_dir():
        raise InvalidArgumentError(f"submissions folder {str(folder)!r} does not exist; expected a folder of notebooks")
    if not timeout > 0:
        raise InvalidArgumentError(f"grading timeout {timeout!r}: expected a positive number of seconds")
    lessons = sorted(p.stem for p in autograder.glob("[0-9][0-9]_*.zip"))
    if not lessons:
        raise InvalidArgumentError(f"no autograder zips (NN_topic.zip) in {str(autograder)!r}: run `make student` first")
    found, skipped = _submissions(folder, lessons)
    for line in skipped:
        print(f"warning: skipped {line}", file=sys.stderr)
    if not found:
        raise InvalidArgumentError(f"no submitted notebooks (*.ipynb) to grade below {str(folder)!r}"
                                   + "".join(f"; skipped {line}" for line in skipped))
    graders = {lesson: _autograder(autograder / f"{lesson}.zip") for lesson in {lesson for _, lesson, _ in found}}
    rows = []
    for student, lesson, path in found:
        scores, notes, flagged = {}, [], False
        try:
            terms = _suspicious(nbformat.read(path, as_version=4), graders[lesson][1])
        except Exception as exc:  # noqa: BLE001 - any unreadable file (empty, not JSON, not a notebook) is noted
            notes.append(f"could not read the notebook ({type(exc).__name__}): not graded")
        else:
            if terms:
                flagged = True
                notes.append(f"review: its code mentions the grader's internals ({', '.join(terms)})")
            scores, failure = _grade_isolated(path, autograder / f"{lesson}.zip", timeout)
            if failure:
                notes.append(failure)
        for note in notes:
            print(f"warning: {path}: {note}", file=sys.stderr)
        names = sorted(set(scores) | set(graders[lesson][0]), key=_question_order) or [""]
        for name in names:
            passed, score = scores.get(name, (False, 0.0))
            rows.append({"student": _safe(student), "lesson": lesson, "exercise": name, "passed": str(passed).lower(),
                         "points": f"{score:g}", "flagged": str(flagged).lower(),
                         "note": _safe("; ".join(notes) if name in scores or not scores else
                                       "; ".join(notes + ["no result for this exercise"]))})
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows, skipped


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
    command.add_argument("csv", help="the CSV to write: " + ", ".join(CSV_COLUMNS))
    command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                         help=f"seconds each submission may run before it is stopped (default {DEFAULT_TIMEOUT})")
    command = commands.add_parser("grade-one", help="grade one notebook into a JSON file (run by grade, per notebook)")
    command.add_argument("submission")
    command.add_argument("autograder")
    command.add_argument("out")
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
            print(f"student release: {plural(len(lessons), 'notebook')} in {args.student}/, "
                  f"autograders in {args.autograder}/")
        elif args.command == "grade-one":
            _grade_one(args.submission, args.autograder, args.out)
        else:
            if not args.submissions:
                raise InvalidArgumentError("no submissions folder given: make grade SUBMISSIONS=folder")
            rows, skipped = grade_folder(args.submissions, args.autograder, args.csv, timeout=args.timeout)
            notebooks = {(row["student"], row["lesson"]) for row in rows}
            flagged = {(row["student"], row["lesson"]) for row in rows if row["flagged"] == "true"}
            passed = sum(row["passed"] == "true" for row in rows)
            students = {student for student, _ in notebooks}
            print(f"grades for {plural(len(notebooks), 'notebook')} from {plural(len(students), 'student')}: "
                  f"{passed} of {plural(len(rows), 'exercise')} passed; wrote {args.csv}")
            if skipped:
                print(f"skipped {plural(len(skipped), 'file')} (see the warnings): "
                      + ", ".join(line.split(": ")[0] for line in skipped))
            if flagged:
                print(f"flagged {plural(len(flagged), 'notebook')} for review (its code reaches into the grader): "
                      + ", ".join(f"{s} {lesson}" for s, lesson in sorted(flagged)))
            print(f"note: {NO_CONTAINER}")
    except InvalidArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
