"""What a learner would see go wrong: the committed notebook against JupyterLab's run of it.

Three views of one notebook meet here: `committed` (the .ipynb in the repository: how many plots,
widgets and progress bars each cell showed), `ran` (the notebook as JupyterLab saved it after
"Restart Kernel and Run All Cells": execution counts, error outputs) and `seen` (per cell, what the
browser rendered: <img> elements, live widget views, text). No browser is needed here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import ipywidgets

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
TEXT_PROGRESS = re.compile(r"\d+%\|")  # tqdm's console bar: " 40%|████      | 8/20 [...]"
# A widget shown as its text repr ("IntSlider(value=3)") instead of a live view. Text/Label/HTML/media
# names are left out: matplotlib's "Text(0.5, 1.0, 'loss')" is an ordinary result, not a dead widget.
_NOT_A_WIDGET_REPR = {"Text", "Label", "HTML", "HTMLMath", "Image", "Audio", "Video"}
WIDGET_NAMES = sorted({name for name, obj in vars(ipywidgets).items()
                       if isinstance(obj, type) and issubclass(obj, ipywidgets.DOMWidget)
                       and name not in _NOT_A_WIDGET_REPR} | {"interactive"})
WIDGET_REPR = re.compile(r"^(?:%s)\(" % "|".join(WIDGET_NAMES), re.MULTILINE)
ALLOWED_TO_RAISE = "raises-exception"  # nbval's tag; no lesson uses it (errors are shown by expect_error)


@dataclass(frozen=True)
class Problem:
    """One thing a learner would see go wrong. kind: browser, cells, timeout, not-run, error, plot,
    progress-text, progress, dead-widget, widget, widget-text or slider."""
    kind: str
    message: str
    cell: int | None = None  # 1-based, as a reader counts cells in JupyterLab

    def __str__(self) -> str:
        return self.message if self.cell is None else f"cell {self.cell}: {self.message}"


@dataclass
class Expected:
    """What a committed code cell shows: plots, widget views, and progress bars among those."""
    images: int = 0
    widgets: int = 0
    progress_bars: int = 0


def live_widget_ids(notebook) -> set[str] | None:
    """Ids of the widget models still open when the notebook was saved (None: no widget state saved)."""
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json")
    return set(state.get("state", {})) if state else None


def expected_outputs(cell, live_ids: set[str] | None = None) -> Expected:
    """What `cell` showed when committed; a widget closed before saving (tqdm's leave=False) shows nothing."""
    expected = Expected()
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "image/png" in data:
            expected.images += 1
        view = data.get(WIDGET_MIME)
        if view and view.get("model_id") and (live_ids is None or view["model_id"] in live_ids):
            expected.widgets += 1
            if TEXT_PROGRESS.search(str(data.get("text/plain", ""))):  # tqdm's widget keeps a text fallback
                expected.progress_bars += 1
    return expected


def first_line(text: str, width: int = 90) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[:width - 1] + "…"


def errors_of(cell) -> list[str]:
    return [f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def run_problems(committed, ran, seen: dict, source: str) -> list[tuple[str, str]]:
    """The cell did not run, or it raised (a cell tagged raises-exception may)."""
    found = []
    if committed.source.strip() and ran.get("execution_count") is None:
        found.append(("not-run", f"did not run (prompt {seen['prompt']!r}): {source}"))
    if ALLOWED_TO_RAISE not in committed.metadata.get("tags", []):
        for error in errors_of(ran) + seen["widget_errors"]:
            found.append(("error", f"shows an error: {first_line(error)}  [{source}]"))
    return found


def plot_problems(expected: Expected, seen: dict, source: str) -> list[tuple[str, str]]:
    """A committed plot that is not an <img> now, or an <img> that did not load."""
    found = []
    if seen["images"] < expected.images:
        found.append(("plot", f"{expected.images} plot(s) in the committed notebook, {seen['images']} "
                              f"rendered as <img>: {source}"))
    if seen["broken_images"]:
        found.append(("plot", f"{seen['broken_images']} <img> did not load: {source}"))
    return found


def text_problems(seen: dict) -> list[tuple[str, str]]:
    """Text where a widget belongs: tqdm's console bar, a widget's repr."""
    found = []
    for text in seen["texts"]:
        bar = next((line for line in text.splitlines() if TEXT_PROGRESS.search(line)), None)
        if bar:
            found.append(("progress-text", f"a progress bar is text, not a widget (use tqdm.auto): "
                                           f"{bar.strip()[:60]}"))
        if match := WIDGET_REPR.search(text):
            found.append(("widget-text", f"a widget is its text repr, not live: "
                                         f"{first_line(text[match.start():], 60)}"))
    return found


def widget_problems(expected: Expected, seen: dict, source: str) -> list[tuple[str, str]]:
    """Fewer live widget views or progress bars than committed, or a view that never loaded."""
    found = []
    if seen["progress_bars"] < expected.progress_bars:
        found.append(("progress", f"{expected.progress_bars} progress bar widget(s) expected, "
                                  f"{seen['progress_bars']} rendered: {source}"))
    for text in seen["dead_widgets"]:
        found.append(("dead-widget", f"a widget is not live ({first_line(text)!r}): {source}"))
    if seen["widgets"] < expected.widgets and not seen["dead_widgets"]:
        found.append(("widget", f"{expected.widgets} widget view(s) expected, {seen['widgets']} rendered live: "
                                f"{source}"))
    return found


def cell_problems(committed, ran, seen: dict, live_ids: set[str] | None = None) -> list[tuple[str, str]]:
    """(kind, message) for one code cell; see the module docstring for the three views."""
    source = first_line(committed.source)
    expected = expected_outputs(committed, live_ids)
    return (run_problems(committed, ran, seen, source) + plot_problems(expected, seen, source)
            + text_problems(seen) + widget_problems(expected, seen, source))


def find_problems(committed, ran, seen: list[dict]) -> list[Problem]:
    """Every way JupyterLab's run (`ran`, rendered as `seen`) falls short of the committed notebook."""
    counts = {len(committed.cells), len(ran.cells), len(seen)}
    if len(counts) != 1:
        return [Problem("cells", f"the notebook has {len(committed.cells)} cells, JupyterLab saved "
                                 f"{len(ran.cells)} and shows {len(seen)}")]
    problems, live_ids = [], live_widget_ids(committed)
    for number, (cell, ran_cell, seen_cell) in enumerate(zip(committed.cells, ran.cells, seen), start=1):
        if cell.cell_type == "code":
            problems += [Problem(kind, message, number)
                         for kind, message in cell_problems(cell, ran_cell, seen_cell, live_ids)]
    return problems
