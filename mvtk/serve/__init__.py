"""Serving a model over HTTP: a FastAPI/uvicorn service that follows a registry alias (Lesson 10).

Import everything from here (`from mvtk.serve import start_service, ServeConfig`); the files below
hold the code, each importing only the ones above it:

| file           | Lesson 10                         | what it holds                                           |
|----------------|-----------------------------------|---------------------------------------------------------|
| `config.py`    | §3 settings                       | ServeConfig, the command line's arguments               |
| `model.py`     | §2 a verified version             | ServedModel, load_verified, probe_batch, failure_text   |
| `watcher.py`   | §6-§7 following the alias         | AliasWatcher: poll, verify, swap or refuse              |
| `batching.py`  | §5 request batching               | MicroBatcher                                            |
| `metrics.py`   | §3 metrics, §8 drift              | ServeMetrics (prometheus-client), DriftWindow           |
| `payload.py`   | §4 bad requests                   | RequestError, read_body 408/413/415, parse_inputs 422   |
| `app.py`       | §3 the endpoints                  | create_app                                              |
| `bootstrap.py` | §3 a first model                  | ensure_model: the course MLP for an empty registry      |
| `process.py`   | §3 its own process, §9 SIGTERM    | start_service, ServiceProcess                           |
| `load.py`      | §5 load tests                     | load_test, run_load, in_process, LoadResult             |
| `__main__.py`  | §3 `python -m mvtk.serve`         | main                                                    |
"""
from __future__ import annotations

from mvtk.serve.app import create_app, drift_reference
from mvtk.serve.batching import MicroBatcher
from mvtk.serve.bootstrap import BOOTSTRAP_EPOCHS, ensure_model
from mvtk.serve.config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig, parse_args, to_args
from mvtk.serve.load import LoadResult, in_process, load_test, request_bodies, run_load
from mvtk.serve.metrics import PREFIX, DriftWindow, ServeMetrics, parse_metrics
from mvtk.serve.model import (NOT_FINITE, PROBE_SIZE, STALE_STAGING_S, ServedModel, failure_text, finite_rows,
                              load_verified, probe_batch, remove_stale_staging)
from mvtk.serve.payload import RequestError, parse_inputs, read_body
from mvtk.serve.process import FD_ENV, PARENT_ENV, ServiceError, ServiceProcess, start_service
from mvtk.serve.watcher import AliasWatcher

__all__ = [
    # §2: a verified version (model)
    "ServedModel", "load_verified", "probe_batch", "PROBE_SIZE", "finite_rows", "failure_text", "NOT_FINITE",
    "remove_stale_staging", "STALE_STAGING_S",
    # §3: settings, the app, its process, a first model (config, app, process, bootstrap)
    "ServeConfig", "parse_args", "to_args", "DEFAULT_HOST", "DEFAULT_PORT", "create_app", "drift_reference",
    "start_service", "ServiceProcess", "ServiceError", "FD_ENV", "PARENT_ENV", "ensure_model", "BOOTSTRAP_EPOCHS",
    # §3, §8: metrics and drift (metrics)
    "ServeMetrics", "DriftWindow", "PREFIX", "parse_metrics",
    # §4: bad requests (payload)
    "RequestError", "read_body", "parse_inputs",
    # §5: batching and load tests (batching, load)
    "MicroBatcher", "load_test", "run_load", "in_process", "request_bodies", "LoadResult",
    # §6-§7: following the alias (watcher)
    "AliasWatcher",
]
