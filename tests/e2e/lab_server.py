"""A JupyterLab server for the browser tests: 127.0.0.1, a free port, a random token, nothing from the network.

It serves a throw-away copy of notebooks/ (lessons write runs/ next to themselves) plus the test
fixtures, with its own config, runtime and settings folders so no user configuration leaks in.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
LESSON_GLOB = "[0-9][0-9]_*.ipynb"
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"
FIXTURE_FOLDER = "e2e_fixtures"  # where the fixtures are served, next to the lessons
JUPYTER = Path(sys.executable).with_name("jupyter")
SERVER_START_S = 120  # a busy 2-core machine needs a while to start jupyter lab

# Nothing may reach the network: no extension manager (PyPI), no news feed, no update check.
OFFLINE_OPTIONS = ["--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
# User settings: no "get news?" toast, no autosave (the test saves once, after the run), and every cell
# kept in the DOM (no windowing), so that what the tests count is the whole notebook.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


class LabError(RuntimeError):
    """The test server failed: it did not start, or its REST API refused a request."""


@contextmanager
def private_tmp_dir():
    """A temporary folder for a server's copy of the course, config and runtime files, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mvtk-e2e-", ignore_cleanup_errors=True) as name:
        yield Path(name)


def lesson_notebooks() -> list[Path]:
    """The course's NN_topic.ipynb notebooks present now (read when pytest collects)."""
    return sorted(NOTEBOOK_DIR.glob(LESSON_GLOB))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and body of a GET (an HTTP error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def isolated_jupyter_env(workdir: Path) -> dict[str, str]:
    """Environment for a test server: its own config, runtime, settings and workspaces folders."""
    env = dict(os.environ)
    for key, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[key] = str(workdir / sub)
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # a `make lab` started under `make test` is a fresh make
        env.pop(key, None)
    return env


def write_lab_settings(settings_dir: Path, settings: dict = LAB_SETTINGS) -> None:
    for name, values in settings.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def copy_course(dest: Path) -> Path:
    """A throw-away copy of notebooks/, and the fixtures (stored as .json so nbval never collects them)."""
    shutil.copytree(NOTEBOOK_DIR, dest, ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints"))
    (dest / FIXTURE_FOLDER).mkdir()
    for path in FIXTURE_DIR.glob("*.json"):
        shutil.copyfile(path, dest / FIXTURE_FOLDER / f"{path.stem}.ipynb")
    return dest


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Ask the whole process group to stop (jupyter cleans up on SIGTERM); kill it if it does not in time."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


class LabServer:
    """`jupyter lab` on 127.0.0.1 with a free port and a random token, serving `root`."""

    def __init__(self, root: Path, workdir: Path, *, options: list[str] = OFFLINE_OPTIONS,
                 settings: dict = LAB_SETTINGS, config_path: Path | None = None):
        """`options` and `settings` make it offline and quiet; a test of the shipped jupyter/ folder passes
        `config_path` (put on JUPYTER_CONFIG_PATH, as `make lab` does) and only the settings it needs."""
        self.root = root
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "jupyter-lab.log"
        self._shutdowns: list[threading.Thread] = []
        env = isolated_jupyter_env(workdir)
        if config_path is not None:
            env["JUPYTER_CONFIG_PATH"] = str(config_path)
        write_lab_settings(workdir / "settings", settings)
        command = [str(JUPYTER), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
                   f"--LabApp.user_settings_dir={workdir / 'settings'}",
                   f"--LabApp.workspaces_dir={workdir / 'workspaces'}", *options]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
            command.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http_get(self.api_url("status"), timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise LabError(f"jupyter lab did not answer within {SERVER_START_S} s:\n{self.log_tail()}")

    def api_url(self, path: str) -> str:
        return f"{self.url}/api/{quote(path)}?token={self.token}"

    def notebook_url(self, relpath: str) -> str:
        """The single-document view of one notebook (JupyterLab's /doc URL)."""
        return f"{self.url}/doc/tree/{quote(relpath)}?token={self.token}"

    def contents(self, relpath: str) -> dict:
        """The Contents API model of a file (a notebook's JSON under "content")."""
        status, body = http_get(self.api_url(f"contents/{relpath}"))
        if status != 200:
            raise LabError(f"GET /api/contents/{relpath} answered {status}: {body[:200]!r}")
        return json.loads(body)

    def shut_down_kernels(self) -> None:
        """Stop every kernel (each holds a torch process in memory) in the background: the next notebook
        can load meanwhile, since a kernel takes a few seconds to exit."""
        status, body = http_get(self.api_url("sessions"))
        for session in json.loads(body) if status == 200 else []:
            thread = threading.Thread(target=self._delete, args=(f"sessions/{session['id']}",), daemon=True)
            thread.start()
            self._shutdowns.append(thread)

    def _delete(self, path: str) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(self.api_url(path), method="DELETE"), timeout=60).close()
        except OSError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        for thread in self._shutdowns:
            thread.join(timeout=60)
        stop_process_group(self.process)
