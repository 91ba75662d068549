"""`make lab`, the README's first command: it starts, serves the course at the URL it prints, and stops on Ctrl-C.

The real target runs (jupyter lab --notebook-dir=notebooks, venv already set up) in a pseudo-terminal,
so Ctrl-C is typed as a learner types it and answered with "y" at jupyter's "Shut down this Jupyter
server (y/[n])?". Only jupyter's per-user configuration is redirected to a temporary folder: no browser
opened, a free port, no network checks, and allow_root where CI runs as root.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import subprocess
import termios
import threading
import time
import urllib.request

import pytest
from jupyter_client import BlockingKernelClient

from lab_server import (NOTEBOOK_DIR, ROOT, free_port, http_get, isolated_jupyter_env, private_tmp_dir,
                        stop_process_group)

pytestmark = pytest.mark.e2e

STAMP = ".venv/.installed-from-pyproject"
START_S = 120
STOP_S = 30
PRINTED_URL = re.compile(r"(http://(?:localhost|127\.0\.0\.1):(\d+)/lab\?token=([0-9a-f]+))")
CONFIRM = "Shut down this Jupyter server (y/[n])?"
CTRL_C = b"\x03"


def user_config(port: int) -> dict[str, dict]:
    """What a user would put in ~/.jupyter for a headless run; the Makefile's own options stay as they are."""
    server = {"open_browser": False, "port": port, "port_retries": 0}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        server["allow_root"] = True
    return {"jupyter_server_config.json": {"ServerApp": server},
            "jupyter_lab_config.json": {"LabApp": {"extension_manager": "readonly", "news_url": None,
                                                   "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}}


def _take_terminal() -> None:
    """In the child (already a session leader): make the pty on stdin its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command in a pseudo-terminal: what it prints is collected; keys are typed into it."""

    def __init__(self, command: list[str], cwd, env):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not data:
                return
            self._chunks.append(data.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self._chunks)

    def wait_for(self, pattern: re.Pattern | str, timeout: float):
        """The first match of `pattern` in the output, or None after `timeout` s or when the command ends."""
        pattern = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(self.text()):
                return match
            if self.process.poll() is not None:
                return pattern.search(self.text())
            time.sleep(0.2)
        return None

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        stop_process_group(self.process)
        self._reader.join(timeout=5)
        os.close(self.master)


@pytest.fixture
def make_lab():
    """`make lab` in a terminal of its own; yields (terminal, runtime dir)."""
    with private_tmp_dir() as workdir:
        terminal = start_make_lab(workdir)
        yield terminal, workdir / "runtime"
        terminal.close()


def start_make_lab(workdir) -> Terminal:
    """Run `make lab` with jupyter's user config, runtime and settings folders under `workdir`."""
    env = isolated_jupyter_env(workdir)
    if subprocess.run(["make", "--question", STAMP], cwd=ROOT, env=env, capture_output=True).returncode != 0:
        pytest.skip(f"{STAMP} is out of date: `make lab` would reinstall the venv first; run `make unit` once")
    for name, config in user_config(free_port()).items():
        (workdir / "config" / name).write_text(json.dumps(config))
    env["TERM"] = "dumb"  # no colours in jupyter's log
    return Terminal(["make", "lab"], ROOT, env)


def start_kernel(base: str, token: str, runtime, timeout: float = 120) -> str:
    """Start a kernel through the REST API, as opening a notebook does, and wait until it answers."""
    request = urllib.request.Request(f"{base}/api/kernels", data=json.dumps({"name": "python3"}).encode(),
                                     headers={"Authorization": f"token {token}"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        kernel = json.loads(response.read())["id"]
    client = BlockingKernelClient(connection_file=str(runtime / f"kernel-{kernel}.json"))
    client.load_connection_file()
    client.start_channels(iopub=False, stdin=False, hb=False, control=False)
    try:
        client.kernel_info()
        client.get_shell_msg(timeout=timeout)  # the kernel's reply: it is up and listening
    finally:
        client.stop_channels()
    return kernel


def test_make_lab_serves_the_course_and_stops_cleanly_on_ctrl_c(make_lab):
    terminal, runtime = make_lab
    match = terminal.wait_for(PRINTED_URL, START_S)
    assert match, f"`make lab` printed no http://…/lab?token=… URL within {START_S} s:\n{terminal.text()}"
    url, port, token = match.groups()
    base = f"http://127.0.0.1:{port}"

    status, page = http_get(url)
    assert status == 200 and b"JupyterLab" in page, f"GET {url} answered {status}"
    status, body = http_get(f"{base}/api/contents?token={token}")
    assert status == 200, f"/api/contents answered {status}"
    listed = {item["name"] for item in json.loads(body)["content"] if item["type"] == "notebook"}
    on_disk = {path.name for path in NOTEBOOK_DIR.glob("*.ipynb")}
    assert listed == on_disk, f"`make lab` lists {sorted(listed)}, notebooks/ holds {sorted(on_disk)}"
    kernel = start_kernel(base, token, runtime)

    terminal.type(CTRL_C)
    assert terminal.wait_for(CONFIRM, STOP_S), f"no confirmation question after Ctrl-C:\n{terminal.text()}"
    terminal.type(b"y\n")
    try:
        terminal.process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`make lab` still running {STOP_S} s after Ctrl-C, y:\n{terminal.text()}")

    log = terminal.text()
    assert "Shutdown confirmed" in log and f"Kernel shutdown: {kernel}" in log, log
    assert "Traceback" not in log, log
    assert not list(runtime.glob("jpserver-*.json")), "the server left its info file behind"
    assert not list(runtime.glob("kernel-*.json")), "a kernel's connection file was left behind"
    with pytest.raises(ProcessLookupError):  # jupyter and everything it started in the terminal are gone
        os.killpg(terminal.process.pid, 0)
    with pytest.raises(OSError):
        http_get(url, timeout=3)
