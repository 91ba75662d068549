"""Fixtures of the browser tests: one JupyterLab server and one headless Chromium per test session (worker).

Without /usr/bin/chromium the tests are skipped with a loud reason (also printed in pytest's header);
with MVTK_REQUIRE_BROWSER=1 (set by .ci/run) a missing Chromium fails them instead.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from lab_browser import CHROMIUM, CHROMIUM_ARGS, MISSING_CHROMIUM, VIEWPORT, PlaywrightError, close_notebook
from lab_server import LabError, LabServer, copy_course, private_tmp_dir

# The broken fixture is stored as .json, so nbval (active under `make test`) never collects it;
# this keeps any future .ipynb fixture out of collection as well.
collect_ignore_glob = ["fixtures/*"]


def pytest_report_header(config):
    if not CHROMIUM.exists():
        return [f"!!! BROWSER TESTS WILL BE SKIPPED: {MISSING_CHROMIUM}"]
    return None


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("MVTK_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MVTK_REQUIRE_BROWSER=1 (CI) and {MISSING_CHROMIUM}", pytrace=False)
    pytest.skip(f"BROWSER TESTS SKIPPED: {MISSING_CHROMIUM}")


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium driven by Playwright (no browser download), headless, no background networking."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport=VIEWPORT)  # one context: JupyterLab's assets stay cached
        yield context
        context.close()
        browser.close()


@pytest.fixture(scope="session")
def lab(chromium):
    """JupyterLab on 127.0.0.1 (free port, random token) over a temporary copy of notebooks/."""
    with private_tmp_dir() as workdir:
        server = LabServer(copy_course(workdir / "course"), workdir)
        yield server
        server.stop()


@pytest.fixture(scope="session")
def _lab_tab() -> dict:
    return {}


@contextmanager
def borrowed_tab(chromium, lab, holder: dict):
    """The browser tab that shows JupyterLab, reused from notebook to notebook (loading JupyterLab costs a
    few CPU-seconds); the notebook is closed and its kernel shut down afterwards. If closing fails (a stuck
    dialog), the tab is dropped and the next notebook gets a fresh one."""
    page = holder.get("page")
    if page is None or page.is_closed():
        page = holder["page"] = chromium.new_page()
    try:
        yield page
    finally:
        try:
            close_notebook(page)
        except (PlaywrightError, LabError):
            page.close()
        lab.shut_down_kernels()


@pytest.fixture
def lab_page(chromium, lab, _lab_tab):
    """JupyterLab's tab for one test (see borrowed_tab)."""
    with borrowed_tab(chromium, lab, _lab_tab) as page:
        yield page


@pytest.fixture(scope="module")
def module_lab_page(chromium, lab, _lab_tab):
    """JupyterLab's tab for a module's tests that share one run (see borrowed_tab)."""
    with borrowed_tab(chromium, lab, _lab_tab) as page:
        yield page
