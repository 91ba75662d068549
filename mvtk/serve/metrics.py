"""What the service counts, and the drift of what it is sent, in Prometheus format (Lesson 10, §3, §8).

`ServeMetrics` holds the service's own prometheus-client registry: requests by endpoint and status,
latency and batch-size histograms, the version served and the version aliased, swaps and refused
versions. `DriftWindow` keeps the last N served images and scores them against the training images
with Lesson 08's `DriftMonitor`; the score and its alarm become gauges.
"""
from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mvtk.monitor import DriftMonitor, DriftReport, as_features

__all__ = ["ServeMetrics", "DriftWindow", "PREFIX", "parse_metrics"]

PREFIX = "mvtk_serve_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The service's Prometheus instruments, in a registry of their own (Lesson 10, §3)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram(PREFIX + "predict_seconds", "time to answer a predict request",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(PREFIX + "batch_rows", "images per ONNX Runtime call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.images = Counter(PREFIX + "images", "images answered", registry=r)
        self.in_flight = Gauge(PREFIX + "in_flight", "predict requests being answered now", registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when a verified model is being served", registry=r)
        self.version = Gauge(PREFIX + "model_version", "the version being served (0: none)", registry=r)
        self.alias_version = Gauge(PREFIX + "alias_version", "the version the alias points to (0: none)", registry=r)
        self.in_sync = Gauge(PREFIX + "in_sync", "1 when the served version is the aliased one", registry=r)
        self.swaps = Gauge(PREFIX + "swaps", "versions swapped in since start", registry=r)
        self.refused = Gauge(PREFIX + "verification_failures", "versions that failed verification", registry=r)
        self.drift_enabled = Gauge(PREFIX + "drift_enabled", "1 when served images are scored for drift",
                                   registry=r)
        self.drift_psi = Gauge(PREFIX + "drift_psi", "mean PSI of the served window against training (NaN: no score)",
                               registry=r)
        self.drift_alarm = Gauge(PREFIX + "drift_alarm", "1 when drift_psi is above the threshold (NaN: no score)",
                                 registry=r)
        self.drift_samples = Gauge(PREFIX + "drift_window_samples", "images in the drift window", registry=r)
        self.drift_psi.set(float("nan"))  # no score yet is not "no drift"
        self.drift_alarm.set(float("nan"))

    def show_watcher(self, watcher) -> None:
        """Copy the alias watcher's state into the gauges (Lesson 10, §6)."""
        status = watcher.status()
        self.ready.set(int(status["ready"]))
        self.version.set(status["serving_version"] or 0)
        self.alias_version.set(status["alias_version"] or 0)
        self.in_sync.set(int(status["in_sync"]))
        self.swaps.set(watcher.swaps)
        self.refused.set(watcher.failures)

    def show_drift(self, window: "DriftWindow") -> None:
        """Score the drift window (when it has enough images) into the drift gauges (Lesson 10, §8)."""
        report = window.check()
        self.drift_enabled.set(1)
        self.drift_samples.set(window.size)
        if report is not None:
            self.drift_psi.set(report.overall)
            self.drift_alarm.set(int(report.alarm))

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (Lesson 10, §3)."""
        return generate_latest(self.registry)


class DriftWindow:
    """The last `size` served images, scored for drift against a reference on demand (Lesson 10, §8)."""

    def __init__(self, reference, size: int = 200, threshold: float = 0.2):
        self.monitor = DriftMonitor(reference, threshold=threshold)
        self.capacity = size
        self._rows = np.zeros((size, self.monitor.reference.shape[1]), dtype=np.float32)
        self._seen = 0
        self._scored_at = -1
        self._report: DriftReport | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """How many images the window holds now (Lesson 10, §8)."""
        return min(self._seen, self.capacity)

    def add(self, images: np.ndarray) -> None:
        """Append served images (any shape with one image per row), dropping the oldest (Lesson 10, §8)."""
        rows = np.asarray(images, dtype=np.float32).reshape(len(images), -1)[-self.capacity:]
        with self._lock:
            slots = (self._seen + np.arange(len(rows))) % self.capacity
            self._rows[slots] = rows
            self._seen += len(rows)

    def check(self) -> DriftReport | None:
        """The drift report of the window, or None while it holds fewer than 100 images (Lesson 10, §8)."""
        with self._lock:
            if self._seen == self._scored_at:
                return self._report
            seen, live = self._seen, self._rows[: min(self._seen, self.capacity)].copy()
        if len(live) < self.monitor.min_samples:
            return None
        report = self.monitor.check(as_features(live, "served images"))
        with self._lock:
            self._report, self._scored_at = report, seen
        return report


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, comments skipped: what a test or a scraper reads (Lesson 10, §3)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
