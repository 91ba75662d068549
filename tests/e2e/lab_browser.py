"""Drive JupyterLab in headless Chromium as a learner does: open a notebook, Restart Kernel and Run All Cells.

`run_notebook` clears the outputs, restarts and runs everything through the menus, waits until the
kernel is idle, reads what the page renders, saves the notebook (File → Save Notebook) to read what
ran, and hands the three views to `lab_checks.find_problems`. A screenshot goes to screenshots/e2e/
(git-ignored) every time; when something is wrong, the whole notebook and its first problem cell too.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from playwright.sync_api import Error as PlaywrightError

from lab_checks import Problem, find_problems, first_line
from lab_server import ROOT, LabError, LabServer

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium`; Playwright's own download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage"]  # CI containers often give /dev/shm only 64 MB
MISSING_CHROMIUM = (
    f"Chromium not found at {CHROMIUM}: the JupyterLab end-to-end tests (tests/e2e) drive Debian's "
    "chromium in headless mode. Install it with `sudo apt-get update && sudo apt-get install -y chromium` "
    "(.ci/run does this in CI).")
SCREENSHOT_DIR = ROOT / "screenshots" / "e2e"  # git-ignored (.gitignore: screenshots/)
VIEWPORT = {"width": 1400, "height": 1000}
SCREENSHOT_PAGE = 8000  # px of notebook per PNG: the whole notebook, readable, in a few files

OPEN_S = 120    # load JupyterLab, render the notebook, start its kernel
RUN_S = 300     # a lesson runs in < 60 s on 2 cores (design.md §3); room for a machine shared by many
SETTLE_S = 10   # widget views and images render just after the kernel goes idle
SAVE_S = 30
SLIDER_S = 60   # a slider's callback may re-prune and re-evaluate a model
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
SLIDER_LABEL = re.compile(r"prun|amount|sparsity", re.IGNORECASE)

# JavaScript run in the page: it reads only the DOM a learner sees.
_CELLS = "document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')"
_KERNEL = "document.querySelector('.jp-StatusBar-TextItem[title^=\"Change kernel for\"]')"

STATE_JS = """() => {
  const kernel = (%s?.textContent || '').split('|');
  const prompts = Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-InputPrompt'))
      .map(p => p.textContent.trim());  // textContent: no forced layout
  return {
    cells: %s.length,
    kernel: kernel.length > 1 ? kernel[kernel.length - 1].trim().toLowerCase() : 'none',
    running: prompts.some(p => p === '[*]:'),
    started: prompts.length === 0 || prompts.some(p => /^\\[\\d+\\]:$/.test(p)),
  };
}""" % (_KERNEL, _CELLS)

OBSERVE_JS = """() => Array.from(%s).map(cell => {
  const area = cell.querySelector('.jp-Cell-outputArea');
  const all = area ? Array.from(area.querySelectorAll('.jp-OutputArea-output')) : [];
  const top = area ? Array.from(area.querySelectorAll(
      ':scope > .jp-OutputArea-child > .jp-OutputArea-output')) : [];
  const text = o => (o.innerText || o.textContent || '');
  const dead = t => /^(Loading widget\\.\\.\\.|Error displaying widget)/.test(t.trim());
  const textual = ['application/vnd.jupyter.stdout', 'application/vnd.jupyter.stderr', 'text/plain'];
  const images = area ? Array.from(area.querySelectorAll('img')) : [];
  return {
    prompt: (cell.querySelector('.jp-InputPrompt')?.innerText || '').trim(),
    texts: all.filter(o => textual.includes(o.getAttribute('data-mime-type'))).map(text),
    widget_errors: all.filter(o => o.closest('.widget-output') && /Traceback \\(most recent call last\\)/.test(text(o)))
        .map(text),
    images: images.length,
    broken_images: images.filter(i => !i.complete || i.naturalWidth === 0).length,
    widgets: top.filter(o => o.querySelector('.jupyter-widgets') && !dead(text(o))).length,
    progress_bars: area ? area.querySelectorAll('.widget-hprogress, .widget-vprogress').length : 0,
    dead_widgets: all.filter(o => dead(text(o))).map(text),
  };
})""" % _CELLS

SETTLED_JS = """() => {
  const outs = Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output'));
  const images = Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea img'));
  return !outs.some(o => (o.textContent || '').trim().startsWith('Loading widget')) && images.every(i => i.complete);
}"""

# What a reader sees in outputs and widget texts, without the sliders' own readouts.
DISPLAYED_TEXT_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel .jp-OutputArea-output[data-mime-type], .jp-NotebookPanel .widget-html-content,'
    + ' .jp-NotebookPanel .widget-label-basic')).map(e => e.innerText || e.textContent || '').join('\\n')"""

SLIDERS_JS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel .widget-slider'))
    .map(s => (s.querySelector('.widget-label')?.innerText || '').trim())"""

SCROLL_JS = """top => {
  const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
  const cells = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell');
  if (!scroller || !cells.length) return {height: 0, visible: 0};
  scroller.scrollTop = top;
  const last = cells[cells.length - 1].getBoundingClientRect().bottom;  // not the blank space after it
  const height = last - scroller.getBoundingClientRect().top + scroller.scrollTop;
  return {height: Math.ceil(height), visible: scroller.clientHeight};
}"""

SHOW_CELL_JS = """index => document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[index]
    ?.scrollIntoView({block: 'start'})"""


def state(page) -> dict:
    return page.evaluate(STATE_JS)


def click_menu(page, menu: str, item: str) -> None:
    """Open a menu of the menu bar and click one of its items."""
    page.get_by_role("menuitem", name=menu, exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).click()


def open_notebook(page, server: LabServer, relpath: str, cells: int) -> None:
    """Open the notebook (File → Open from Path… in a tab that already shows JupyterLab, else its URL)
    and wait until all its cells are shown and its kernel is idle."""
    if page.url.startswith(server.url):  # JupyterLab is loaded: no second load of its 10 MB of JavaScript
        click_menu(page, "File", "Open from Path…")
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input").fill(relpath)
        dialog.locator("button.jp-mod-accept").click()
    else:
        page.goto(server.notebook_url(relpath), timeout=OPEN_S * 1000)
    page.wait_for_function(f"() => ({STATE_JS})().cells === {cells} && ({STATE_JS})().kernel === 'idle'",
                           timeout=OPEN_S * 1000, polling=250)


def close_notebook(page) -> None:
    """File → Close Tab (Discard, if JupyterLab asks about unsaved changes); the caller shuts the kernel
    down in the background, which is quicker than File → Close and Shut Down Notebook…."""
    click_menu(page, "File", "Close Tab")
    deadline = time.monotonic() + SAVE_S
    while page.locator(".jp-NotebookPanel").count() and time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            discard = dialog.locator("button", has_text="Discard")
            (discard if discard.count() else dialog.locator("button.jp-mod-accept")).click()
        page.wait_for_timeout(200)
    if page.locator(".jp-NotebookPanel").count():
        raise LabError("the notebook did not close")


def restart_and_run_all(page) -> None:
    """Edit → Clear Outputs of All Cells, then Kernel → Restart Kernel and Run All Cells… → Restart."""
    click_menu(page, "Edit", "Clear Outputs of All Cells")
    click_menu(page, "Kernel", "Restart Kernel and Run All Cells…")
    dialog = page.locator(".jp-Dialog")
    title = dialog.locator(".jp-Dialog-header").inner_text()
    if "Restart Kernel" not in title:
        raise LabError(f"expected the 'Restart Kernel?' dialog, JupyterLab showed {title!r}")
    dialog.locator("button.jp-mod-accept").click()
    dialog.wait_for(state="detached")


def wait_until_idle(page, timeout: float = RUN_S) -> Problem | None:
    """Wait until no cell is queued or running and the kernel has stayed idle for two polls (1 s)."""
    deadline = time.monotonic() + timeout
    idle_polls, now = 0, {}
    page.wait_for_timeout(500)  # let the restart begin
    while time.monotonic() < deadline:
        now = state(page)
        # outputs were cleared, so a numbered prompt means Run All has begun (not the instant after the restart)
        done = now["kernel"] == "idle" and not now["running"] and now["started"]
        idle_polls = idle_polls + 1 if done else 0
        if idle_polls >= 2:
            break
        page.wait_for_timeout(500)
    else:
        return Problem("timeout", f"the notebook did not finish within {timeout:.0f} s "
                                  f"(kernel {now.get('kernel')}, cells still running: {now.get('running')})")
    try:
        page.wait_for_function(SETTLED_JS, timeout=SETTLE_S * 1000)
    except PlaywrightError:  # a dead widget never settles; lab_checks names it
        pass
    return None


def save_and_read(page, server: LabServer, relpath: str):
    """File → Save Notebook, then read back what JupyterLab wrote (execution counts, error outputs)."""
    before = server.contents(relpath)["last_modified"]
    click_menu(page, "File", "Save Notebook")
    deadline, clicked_again = time.monotonic() + SAVE_S, False
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if not clicked_again and deadline - time.monotonic() < SAVE_S / 2 and not page.locator(".jp-Dialog").count():
            click_menu(page, "File", "Save Notebook")  # once more, in case a busy machine lost the click
            clicked_again = True
        try:
            model = server.contents(relpath)
        except LabError:  # the server writes the file in place: mid-save it reads as unreadable JSON
            continue
        if model["last_modified"] != before:
            return nbformat.from_dict(model["content"])
    dialog = page.locator(".jp-Dialog")
    shown = f"; it shows a dialog: {first_line(dialog.inner_text(), 200)!r}" if dialog.count() else ""
    raise LabError(f"JupyterLab did not save {relpath} within {SAVE_S} s{shown}")


def displayed_numbers(page) -> list[str]:
    return NUMBER.findall(page.evaluate(DISPLAYED_TEXT_JS))


def settled_numbers(page, timeout: float = SETTLE_S) -> list[str]:
    """The displayed numbers once they stop changing (an earlier callback may still be redrawing)."""
    numbers, deadline = displayed_numbers(page), time.monotonic() + timeout
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        again = displayed_numbers(page)
        if again == numbers:
            break
        numbers = again
    return numbers


def drag(page, slider, fraction: float) -> None:
    track = slider.locator(".noUi-base").bounding_box()
    handle = slider.locator(".noUi-handle").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], track["y"] + track["height"] / 2, steps=8)
    page.mouse.up()


def move_slider_changes_numbers(page, label: re.Pattern = SLIDER_LABEL, timeout: float = SLIDER_S) -> list[Problem]:
    """Drag the slider whose label matches `label` (else the first one) and expect new numbers on the page."""
    labels = page.evaluate(SLIDERS_JS)
    if not labels:
        return [Problem("slider", "the notebook shows no slider to move")]
    index = next((i for i, text in enumerate(labels) if label.search(text)), 0)
    slider = page.locator(".jp-NotebookPanel .widget-slider").nth(index)
    slider.scroll_into_view_if_needed()
    readout = slider.locator(".widget-readout")
    value, numbers = readout.inner_text(), settled_numbers(page)
    for fraction in (0.85, 0.15):  # the second drag in case the slider already sat near 85 %
        drag(page, slider, fraction)
        if readout.inner_text() != value:
            break
    moved_to = readout.inner_text()
    if moved_to == value:
        return [Problem("slider", f"dragging the slider {labels[index]!r} did not change its value ({value})")]
    # The slider's own value may be echoed in the output; the numbers computed from it must change too.
    echoes = {value, moved_to}
    numbers = [n for n in numbers if n not in echoes]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [n for n in displayed_numbers(page) if n not in echoes] != numbers:
            return []
        page.wait_for_timeout(500)
    return [Problem("slider", f"moving the slider {labels[index]!r} from {value} to {moved_to} changed no "
                              f"displayed number within {timeout:.0f} s")]


def save_screenshots(page, relpath: str, problem_cell: int | None = None, whole: bool = False) -> list[Path]:
    """PNGs in screenshots/e2e/ (git-ignored): NN_topic-1.png, the notebook's first SCREENSHOT_PAGE px, or
    with `whole` every page (-2.png, -3.png…); first NN_topic-problem.png, the first cell with a problem."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    stem = Path(relpath).stem
    for old in SCREENSHOT_DIR.glob(f"{stem}-*.png"):
        old.unlink()
    paths = []
    if problem_cell is not None:
        page.evaluate(SHOW_CELL_JS, problem_cell - 1)
        paths.append(SCREENSHOT_DIR / f"{stem}-problem.png")
        page.screenshot(path=str(paths[-1]))
    visible = page.evaluate(SCROLL_JS, 0)["visible"] + SCREENSHOT_PAGE - VIEWPORT["height"]
    page.set_viewport_size({"width": VIEWPORT["width"], "height": SCREENSHOT_PAGE})
    try:  # JupyterLab lays itself out again a frame or two after the window grows
        page.wait_for_function(f"() => ({SCROLL_JS})(0).visible >= {visible - 2}", timeout=10_000)
        size = page.evaluate(SCROLL_JS, 0)
        tops = range(0, max(size["height"], 1), max(size["visible"], 1)) if whole else [0]
        for number, top in enumerate(tops, start=1):
            page.evaluate(SCROLL_JS, top)
            page.wait_for_timeout(200)
            paths.append(SCREENSHOT_DIR / f"{stem}-{number}.png")
            page.screenshot(path=str(paths[-1]))
    finally:
        page.set_viewport_size(VIEWPORT)
    return paths


@dataclass
class LabRun:
    """The outcome of running one notebook in JupyterLab."""
    name: str
    problems: list[Problem] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    server_log: str = ""  # the end of jupyter's log, kept when the browser or the kernel got stuck

    @property
    def screenshot(self) -> Path | None:
        """The one to look at first: the first cell with a problem, else the notebook's first page."""
        return self.screenshots[0] if self.screenshots else None

    def summary(self) -> str:
        lines = [f"{self.name} in JupyterLab ({self.seconds:.0f} s): {len(self.problems)} problem(s)"]
        lines += [f"  - {problem}" for problem in self.problems]
        lines.append(f"  screenshot: {self.screenshot}")
        pages = [path.name for path in self.screenshots if not path.stem.endswith("-problem")]
        if self.screenshots and pages != [self.screenshot.name]:
            lines.append(f"  the whole notebook: {', '.join(pages)} in {self.screenshots[0].parent}")
        if self.server_log:
            lines += ["  jupyter lab's log (last lines):", self.server_log]
        return "\n".join(lines)


def run_notebook(page, server: LabServer, relpath: str, committed, *, move_slider: bool = False) -> LabRun:
    """Open `relpath`, restart and run all through the UI, and list what a learner would see go wrong."""
    start = time.monotonic()
    run = LabRun(relpath)
    try:
        open_notebook(page, server, relpath, len(committed.cells))
        restart_and_run_all(page)
        timeout = wait_until_idle(page)
        seen = page.evaluate(OBSERVE_JS)
        ran = save_and_read(page, server, relpath)
        run.problems = ([timeout] if timeout else []) + find_problems(committed, ran, seen)
        if move_slider and not run.problems:
            run.problems += move_slider_changes_numbers(page)
    except (PlaywrightError, LabError, OSError) as err:  # JupyterLab did not load, a menu did not open…
        run.problems.append(Problem("browser", f"{type(err).__name__}: {first_line(str(err), 300)}"))
    finally:
        try:
            first_cell = next((problem.cell for problem in run.problems if problem.cell), None)
            run.screenshots = save_screenshots(page, relpath, first_cell, whole=bool(run.problems))
        except PlaywrightError as err:
            run.problems.append(Problem("browser", f"no screenshot: {first_line(str(err), 200)}"))
        run.seconds = time.monotonic() - start
        if any(problem.kind in ("browser", "timeout") for problem in run.problems):
            run.server_log = server.log_tail(15)
    return run
