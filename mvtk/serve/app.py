"""The service: a FastAPI app on uvicorn that answers with whatever the alias points to (Lesson 10, §3).

Endpoints: `POST /predict` (one image or a batch, JSON), `GET /live` (the process answers),
`GET /ready` (a verified model is loaded: 200, else 503 with the reason), `GET /model` (name,
version, alias, SHA-256s) and `GET /metrics` (Prometheus). Every answer to /predict names the
version that computed it. Every answer, an unhandled error's JSON 500 included, is counted in
`mvtk_serve_requests_total` by endpoint and status.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST

from mvtk.data import load_dataset
from mvtk.errors import InputShapeError, MvtkError
from mvtk.registry import Registry
from mvtk.serve.batching import MicroBatcher
from mvtk.serve.config import ServeConfig
from mvtk.serve.metrics import DriftWindow, ServeMetrics
from mvtk.serve.model import NOT_FINITE, finite_rows, remove_stale_staging
from mvtk.serve.payload import RequestError, parse_inputs, read_body
from mvtk.serve.watcher import AliasWatcher

__all__ = ["create_app", "drift_reference"]


def drift_reference(config: ServeConfig, input_shape: tuple[int, ...]) -> np.ndarray | None:
    """The training images drift is scored against: a data set's train split or a .npy file (Lesson 10, §8)."""
    source = config.drift_reference
    if not source:
        return None
    if source.endswith(".npy"):
        return np.load(source, allow_pickle=False)
    if len(input_shape) != 3 or input_shape[0] != 1 or input_shape[1] != input_shape[2]:
        raise MvtkError(f"drift reference {source!r} needs (1, H, H) images; the model takes {input_shape}")
    return load_dataset(source, "train", size=input_shape[1]).images.numpy()


ENDPOINTS = {"/live": "live", "/ready": "ready", "/model": "model", "/predict": "predict", "/metrics": "metrics"}


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body, allow_nan=False), status_code=status, media_type="application/json")


class CountAnswers:
    """ASGI middleware: count every answer's status; an unhandled error becomes a JSON 500 naming its type (Lesson 10, §3)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, started = ENDPOINTS.get(scope["path"], "other"), False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception as exc:
            print(f"unhandled error answering {scope['path']}:\n{traceback.format_exc()}", flush=True)  # the log only
            if started:
                raise
            body = json.dumps({"error": f"internal error ({type(exc).__name__}); the service's log has the details"})
            await counted({"type": "http.response.start", "status": 500,
                           "headers": [(b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body.encode()})


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app for `config`: watcher, batcher and metrics start and stop with it (Lesson 10, §3)."""
    metrics = ServeMetrics()
    state: dict = {"drift": None, "in_flight": 0}

    def run_batch(arrays):
        model = watcher.current  # one version for the whole batch
        try:
            prediction = model.predictor.predict(np.concatenate(arrays))
        except InputShapeError:  # the version changed shape mid-flight: answer each request on its own
            return [_run_one(model, a) for a in arrays]
        metrics.batch_rows.observe(sum(len(a) for a in arrays))
        bounds = np.cumsum([len(a) for a in arrays])[:-1]
        return [_answer(model, labels, probs) for labels, probs in zip(np.split(prediction.labels, bounds),
                                                                        np.split(prediction.probabilities, bounds))]

    def _run_one(model, array):
        try:
            prediction = model.predictor.predict(array)
        except InputShapeError as exc:
            return RequestError(422, str(exc))
        return _answer(model, prediction.labels, prediction.probabilities)

    def _answer(model, labels, probabilities):  # finite input can overflow inside the model: never answer NaN
        bad = ~finite_rows(probabilities)
        if bad.any():
            return RequestError(422, f"{NOT_FINITE} in {int(bad.sum())} of {len(bad)} row(s), first row "
                                     f"{int(np.flatnonzero(bad)[0])}; send values of the size the model was trained on")
        return model, labels, probabilities

    def on_change(watcher):  # in the watcher's thread, after every poll
        metrics.show_watcher(watcher)
        if state["drift"] is None and watcher.current is not None and config.drift_reference:
            try:
                reference = drift_reference(config, watcher.current.input_shape)
                state["drift"] = DriftWindow(reference, size=config.drift_window, threshold=config.drift_threshold)
            except Exception as exc:  # no drift scores, but the service still answers
                state["drift"] = False
                print(f"drift monitoring off: {type(exc).__name__}: {exc}", flush=True)

    registry = Registry(config.registry, create=False, verify_key=config.verify_key or None)
    for staging in remove_stale_staging(config.cache_dir):
        print(f"removed {staging}, an export's staging folder left by a stopped process", flush=True)
    watcher = AliasWatcher(registry, config.model, config.alias, cache_dir=Path(config.cache_dir),
                           poll_s=config.poll_s, threads=config.threads, on_change=on_change,
                           input_shape=config.sample_shape, retry_s=config.retry_s)
    batcher = MicroBatcher(run_batch, max_batch=config.max_batch if config.batching else 1,
                           max_wait_s=config.max_wait_ms / 1000 if config.batching else 0.0,
                           in_flight=lambda: state["in_flight"])

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        watcher.start()
        yield
        await batcher.stop()  # uvicorn has already let every in-flight request finish
        watcher.stop()

    app = FastAPI(title=f"mvtk serve {config.ref}", lifespan=lifespan)
    app.state.watcher, app.state.batcher, app.state.metrics = watcher, batcher, metrics
    app.add_middleware(CountAnswers, metrics=metrics)

    def answer(endpoint: str, status: int, body: dict) -> Response:  # counted by CountAnswers
        return _json(status, body)

    @app.get("/live")
    async def live():
        return answer("live", 200, {"alive": True})

    @app.get("/ready")
    async def ready():
        status = watcher.status()
        return answer("ready", 200 if status["ready"] else 503, status)

    @app.get("/model")
    async def model_info():
        current = watcher.current
        if current is None:
            return answer("model", 503, {"error": f"no verified model for {watcher.ref}: {watcher.problem}"})
        return answer("model", 200, {**current.info(), "alias": watcher.ref, "alias_version": watcher.alias_version})

    @app.post("/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        current = watcher.current
        if current is None:
            return answer("predict", 503, {"error": f"no verified model for {watcher.ref}: {watcher.problem}"})
        metrics.in_flight.inc()
        state["in_flight"] += 1
        try:
            array = parse_inputs(await read_body(request, config.max_body_bytes, config.body_timeout_s),
                                 current.input_shape)
            if len(array) > config.max_rows:
                raise RequestError(413, f"{len(array)} images in one request is over the limit of max_rows="
                                        f"{config.max_rows}; send them in several requests")
            current.predictor.validate(array)
            served, labels, probabilities = await batcher.submit(array)
        except RequestError as exc:
            return answer("predict", exc.status, {"error": str(exc)})
        except InputShapeError as exc:
            return answer("predict", 422, {"error": str(exc)})
        finally:
            metrics.in_flight.dec()
            state["in_flight"] -= 1
        if state["drift"]:
            state["drift"].add(array)
        metrics.images.inc(len(array))
        metrics.latency.observe(time.perf_counter() - started)
        return answer("predict", 200, {"model": served.name, "version": served.version,
                                       "labels": labels.tolist(), "probabilities": probabilities.round(6).tolist()})

    @app.get("/metrics")
    async def prometheus():
        if state["drift"]:
            await run_in_threadpool(metrics.show_drift, state["drift"])
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
