"""The service as its own process: start it on a free port, wait until it answers, stop it cleanly (Lesson 10, §3, §9).

`start_service` binds a listening socket on `config.host` (port 0: the system picks a free one, so
two services never race for a port), hands it to a new `python -m mvtk.serve` process in a session
of its own, and waits for /live (and /ready); the child stops by itself if its starter dies (a killed
notebook kernel leaves no service behind). `ServiceProcess.stop` sends SIGTERM, which uvicorn
turns into a graceful shutdown: stop accepting, finish what is in flight, exit; what is still alive
after `timeout` is killed with its whole process group, so nothing is left behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from mvtk.errors import MvtkError
from mvtk.serve.config import ServeConfig, to_args

__all__ = ["ServiceProcess", "start_service", "FD_ENV", "PARENT_ENV", "ServiceError"]

FD_ENV = "MVTK_SERVE_FD"  # the inherited listening socket's file descriptor, for the child
PARENT_ENV = "MVTK_SERVE_PARENT"  # the starter's pid: the child shuts down when that process is gone


class ServiceError(MvtkError, RuntimeError):
    """The service process did not come up, or did not stop (Lesson 10, §3)."""


class ServiceProcess:
    """A running `python -m mvtk.serve` process: its URL, pid and log; stop() or kill() it (Lesson 10, §3)."""

    def __init__(self, popen: subprocess.Popen, url: str, log_path: Path):
        self.popen, self.url, self.log_path = popen, url, log_path

    @property
    def pid(self) -> int:
        """The process id, also its process group's id (Lesson 10, §3)."""
        return self.popen.pid

    def __repr__(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"ServiceProcess({state})"

    def alive(self) -> bool:
        """True while the process runs (Lesson 10, §3)."""
        return self.popen.poll() is None

    def log(self) -> str:
        """What the process printed so far (Lesson 10, §3)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to `timeout` s for the graceful shutdown, else kill the group; the exit code (Lesson 10, §9)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything in its session at once; reap it (Lesson 10, §3)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_service(config: ServeConfig, *, log_path: str | os.PathLike, ready: bool = True,
                  timeout: float = 90.0) -> ServiceProcess:
    """Start the service for `config` in a new process on a free port; wait for /live (and /ready) (Lesson 10, §3).

    `config.port` 0 lets the system pick the port (the URL has it). The child's output goes to
    `log_path`. Raises ServiceError with the log's end when the process exits or does not answer in time.
    """
    listener = socket.create_server((config.host, config.port), backlog=256)
    host, port = listener.getsockname()[:2]
    url = f"http://{host}:{port}"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, FD_ENV: str(listener.fileno()), PARENT_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([sys.executable, "-m", "mvtk.serve", *to_args(replace(config, port=port))],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 pass_fds=(listener.fileno(),), start_new_session=True)
    listener.close()  # the child holds it now; once it closes it, new connections are refused
    service = ServiceProcess(popen, url, log_path)
    try:
        wait_for(service, "/ready" if ready else "/live", timeout)
    except BaseException:
        service.kill()
        raise
    return service


def wait_for(service: ServiceProcess, path: str, timeout: float) -> None:
    """Poll `path` until it answers 200; ServiceError if the process exits or time runs out (Lesson 10, §3)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(base_url=service.url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not service.alive():
                raise ServiceError(f"the service exited with code {service.popen.returncode} before {path} "
                                   f"answered; its log ends:\n{service.log()[-2000:]}")
            try:
                response = client.get(path)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:300]}"
                failed = "json" in response.headers.get("content-type", "") and response.json().get("failed") is True
                if path == "/ready" and response.status_code == 503 and failed:  # a failed load stays failed
                    raise ServiceError(f"the service cannot load its model: {response.json().get('problem')}; "
                                       f"stopped waiting (the log ends:\n{service.log()[-2000:]})")
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.05)
    raise ServiceError(f"{path} did not answer 200 within {timeout:g} s (last: {last}); "
                       f"the log ends:\n{service.log()[-2000:]}")
