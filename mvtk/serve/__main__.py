"""`python -m mvtk.serve`: serve a registry alias with uvicorn (Lesson 10, §3)."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from pathlib import Path

import uvicorn

from mvtk.env import seed_everything
from mvtk.errors import MvtkError, RegistryError
from mvtk.registry import Registry
from mvtk.serve.app import create_app
from mvtk.serve.bootstrap import ensure_model
from mvtk.serve.config import parse_args
from mvtk.serve.process import FD_ENV, PARENT_ENV

__all__ = ["main"]


def _stop_with_parent(parent: int) -> None:
    """SIGTERM ourselves (a graceful shutdown) once the process that started us is gone: a killed kernel leaves no service."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Parse the settings, optionally bootstrap an empty registry, then run uvicorn until SIGTERM (Lesson 10, §3).

    A setting or registry the service cannot start with ends it with one line on stderr and exit code 2.
    """
    config = parse_args(argv)
    seed_everything(0, threads=config.threads)
    try:
        if config.bootstrap:
            with Registry(config.registry) as registry:
                mv = ensure_model(registry, config.model, config.alias)
            if mv is not None:
                print(f"registered a freshly trained course MLP as {mv.ref} and set {config.ref}", flush=True)
        if "://" not in config.registry and not Path(config.registry).is_dir():
            raise RegistryError(f"no registry at {config.registry!r} (no such folder); pass --registry PATH "
                                "(or set $MVTK_REGISTRY), or --bootstrap true to create one with the course MLP")
        app = create_app(config)
    except MvtkError as exc:
        print(f"python -m mvtk.serve: error: {exc}".replace("or pass --root", "or pass --registry"),
              file=sys.stderr, flush=True)
        return 2
    parent = os.environ.pop(PARENT_ENV, None)
    if parent:
        _stop_with_parent(int(parent))
    inherited = os.environ.pop(FD_ENV, None)
    sockets = [socket.socket(fileno=int(inherited))] if inherited else None
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level=config.log_level, access_log=False,
                                           timeout_graceful_shutdown=config.shutdown_timeout_s))
    print(f"serving {config.ref} from {config.registry} on http://{config.host}:{config.port}", flush=True)
    server.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
