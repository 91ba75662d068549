"""A bounded load test: N concurrent clients, a fixed number of requests, a time limit (Lesson 10, §5).

`load_test` runs asyncio clients, each with its own `httpx.AsyncClient` connection, against a service and records,
for every request, when it finished, its status, its latency and the version that answered. It
stops at `requests` requests or `time_limit_s` seconds, whichever comes first, so it always ends.
`in_process` times the same requests against a `Predictor` called directly: the baseline.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from mvtk.errors import check_number, check_positive_int

__all__ = ["LoadResult", "load_test", "run_load", "in_process", "request_bodies"]


@dataclass
class LoadResult:
    """What a load test saw: per request its finish time, status, latency and version (Lesson 10, §5)."""
    clients: int
    seconds: float = 0.0
    finished: list[float] = field(default_factory=list)    # seconds since the start
    statuses: list[int] = field(default_factory=list)      # HTTP status; 0: no answer (a connection error)
    latencies: list[float] = field(default_factory=list)   # seconds
    versions: list[int | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Requests sent (Lesson 10, §5)."""
        return len(self.statuses)

    @property
    def failed(self) -> int:
        """Requests that did not get a 200 (Lesson 10, §5)."""
        return sum(status != 200 for status in self.statuses)

    @property
    def throughput(self) -> float:
        """Answered requests per second (Lesson 10, §5)."""
        return (self.count - self.failed) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile latency in milliseconds (Lesson 10, §5)."""
        return float(np.percentile(np.asarray(self.latencies) * 1000, q)) if self.latencies else float("nan")

    @property
    def p50_ms(self) -> float:
        """Median latency in ms (Lesson 10, §5)."""
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        """99th-percentile latency in ms (Lesson 10, §5)."""
        return self.percentile_ms(99)

    def row(self) -> str:
        """One line: clients, requests, failures, throughput, p50, p99 (Lesson 10, §5)."""
        return (f"{self.clients:3d} clients  {self.count:5d} requests  {self.failed} failed  "
                f"{self.throughput:7.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms")


def request_bodies(images: np.ndarray, per_request: int = 1) -> list[bytes]:
    """JSON bodies for /predict, `per_request` images each, encoded once before timing (Lesson 10, §5)."""
    images = np.asarray(images, dtype=np.float32)
    check_positive_int(per_request, "per_request")
    return [json.dumps({"inputs": images[i:i + per_request].round(4).tolist()}).encode()
            for i in range(0, len(images) - per_request + 1, per_request)]


async def run_load(url: str, bodies: list[bytes], *, clients: int, requests: int, time_limit_s: float,
                   path: str = "/predict") -> LoadResult:
    """Send `requests` bodies (cycled) from `clients` concurrent clients, stopping at `time_limit_s` (Lesson 10, §5).

    Every client sends at least one request; the clock starts once every client's connection is open.
    """
    check_positive_int(clients, "clients")
    check_positive_int(requests, "requests")
    check_number(time_limit_s, "time_limit_s", low=0, low_open=True)
    result = LoadResult(clients)
    counter = iter(range(requests))
    # one connection per client (a shared pool slows down as clients grow), opened before the clock starts
    pool = [httpx.AsyncClient(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=1))
            for _ in range(clients)]

    async def one_client(client, deadline):
        for index in counter:
            if time.perf_counter() > deadline:
                return
            sent = time.perf_counter()
            try:
                response = await client.post(path, content=bodies[index % len(bodies)],
                                             headers={"content-type": "application/json"})
                status, version = response.status_code, response.json().get("version")
            except (httpx.TransportError, ValueError):
                status, version = 0, None
            now = time.perf_counter()
            result.finished.append(now - start)
            result.statuses.append(status)
            result.latencies.append(now - sent)
            result.versions.append(version)

    try:
        await asyncio.gather(*(client.get("/live") for client in pool))
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, start + time_limit_s) for client in pool))
        result.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(client.aclose() for client in pool))
    return result


def load_test(url: str, bodies: list[bytes], *, clients: int, requests: int = 400, time_limit_s: float = 2.0,
              path: str = "/predict") -> LoadResult:
    """run_load from ordinary code, a notebook included: it runs in a thread with its own event loop (Lesson 10, §5)."""
    box: dict = {}

    def target():
        try:
            box["result"] = asyncio.run(run_load(url, bodies, clients=clients, requests=requests,
                                                 time_limit_s=time_limit_s, path=path))
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="load-test")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def in_process(predictor, images: np.ndarray, *, requests: int = 400, time_limit_s: float = 2.0,
               per_request: int = 1) -> LoadResult:
    """The baseline: the same requests, one at a time, straight into `predictor.predict` (Lesson 10, §5)."""
    images = np.asarray(images, dtype=np.float32)
    result = LoadResult(clients=1)
    start = time.perf_counter()
    for index in range(requests):
        sent = time.perf_counter()
        if sent - start > time_limit_s:
            break
        i = (index * per_request) % max(1, len(images) - per_request + 1)
        predictor.predict(images[i:i + per_request])
        now = time.perf_counter()
        result.finished.append(now - start)
        result.statuses.append(200)
        result.latencies.append(now - sent)
        result.versions.append(None)
    result.seconds = time.perf_counter() - start
    return result
