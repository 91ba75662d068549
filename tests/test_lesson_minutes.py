"""benchmarks/lesson_minutes.py: a lesson's core path is estimated right, and fits one 50-minute class."""
import sys

import nbformat
import pytest

from notebook_utils import NOTEBOOKS, ROOT, read

sys.path.insert(0, str(ROOT / "benchmarks"))
import lesson_minutes  # noqa: E402  (a script in benchmarks/, not a package)

v4 = nbformat.v4


def timed_code(source: str, seconds: float, tags=()):
    """A code cell that nbclient timed at `seconds` when it ran."""
    cell = v4.new_code_cell(source, metadata={"tags": list(tags)})
    cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00.000000Z",
                                  "shell.execute_reply": f"2026-01-01T00:00:{seconds:09.6f}Z"}
    return cell


def synthetic_lesson():
    """Core: 8 words, 3 code lines (+1 not read), 2.5 s, one exercise; then an optional part."""
    return v4.new_notebook(cells=[
        v4.new_markdown_cell("# Title\n\nSee [the glossary](../docs/glossary.md)."),   # 4 words: "#" and the link target are not read
        timed_code("%matplotlib inline\nx = 1\n\ny = 2", 1.5),                         # 2 lines read
        v4.new_raw_cell("# BEGIN QUESTION\nname: q1\npoints: 1"),
        v4.new_markdown_cell("**Exercise 1.** Double it."),                             # 4 words
        v4.new_raw_cell("# BEGIN SOLUTION"),
        timed_code("def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION", 0.5, ["solution"]),
        v4.new_raw_cell("# END SOLUTION"),
        v4.new_raw_cell("# BEGIN TESTS"),
        timed_code("assert double(2) == 4", 0.5),
        v4.new_raw_cell("# END TESTS"),
        v4.new_raw_cell("# END QUESTION"),
        timed_code("# NBVAL_IGNORE_OUTPUT\nprint(x)", 0.0),                             # 1 line read
        v4.new_markdown_cell("## Going further\n\nMany more words that are not counted here."),
        timed_code("z = 3", 30.0),
    ])


def test_the_core_path_stops_at_going_further_and_adds_up():
    found = lesson_minutes.estimate(synthetic_lesson())
    assert (found.words, found.code_lines, found.run_seconds, found.exercises, found.marked) == (8, 3, 2.5, 1, True)
    expected = (8 / lesson_minutes.READING_WPM + 3 / lesson_minutes.CODE_LINES_PER_MINUTE + 2.5 / 60
                + lesson_minutes.EXERCISE_MINUTES)
    assert found.minutes == pytest.approx(expected)


def test_a_lesson_without_going_further_is_counted_whole():
    notebook = synthetic_lesson()
    notebook.cells[-2] = v4.new_markdown_cell("## 9. More")
    found = lesson_minutes.estimate(notebook)
    assert not found.marked and found.run_seconds == pytest.approx(32.5) and found.words == 10


def test_solution_cells_count_as_exercises_before_the_otter_format():
    notebook = v4.new_notebook(cells=[v4.new_markdown_cell("## Exercises"), timed_code("pass", 0, ["solution"]),
                                      timed_code("pass", 0, ["solution"])])
    found = lesson_minutes.estimate(notebook)
    assert found.exercises == 2 and found.code_lines == 0


def test_the_script_prints_a_row_per_lesson_and_fails_on_a_long_marked_core(tmp_path, capsys):
    long = synthetic_lesson()
    long.cells.insert(1, v4.new_markdown_cell("word " * (lesson_minutes.READING_WPM * 60)))   # an hour of prose
    nbformat.write(long, tmp_path / "01_long.ipynb")
    nbformat.write(synthetic_lesson(), tmp_path / "02_short.ipynb")
    assert lesson_minutes.main([str(tmp_path / "02_short.ipynb")]) == 0
    assert lesson_minutes.main([str(tmp_path / "01_long.ipynb"), str(tmp_path / "02_short.ipynb")]) == 1
    out = capsys.readouterr().out
    assert "01_long.ipynb" in out and "OVER 50" in out and "02_short.ipynb" in out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_lessons_core_path_fits_a_50_minute_class(path):
    """The core path ends at 'Going further'; a lesson without that heading is counted whole."""
    found = lesson_minutes.estimate(read(path))
    assert found.minutes <= lesson_minutes.CLASS_MINUTES, (
        f"{path.name}: core path {found.minutes:.0f} min; move optional sections after a 'Going further' heading")
