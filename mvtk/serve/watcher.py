"""Follow a registry alias: load each version it points to, verify it, swap it in whole (Lesson 10, §6-§7).

A background thread reads `name@alias` every `poll_s` seconds. When the alias points somewhere
new it calls `load_verified`; only a version that passes is swapped in, by one assignment, so a
request sees either the old model or the new one, never a mix. A version that fails is remembered
(by number and weights SHA-256) and retried only every `retry_s` seconds (a repaired blob is then
served); the old version keeps answering meanwhile, and `status` says why, without file paths
(the log has the full error).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from mvtk.errors import NotFoundError
from mvtk.serve.model import ServedModel, failure_text, load_verified

__all__ = ["AliasWatcher"]


class AliasWatcher:
    """Serves whatever `name@alias` points to, once it is verified (Lesson 10, §6)."""

    def __init__(self, registry, name: str, alias: str, *, cache_dir, poll_s: float = 0.5, threads: int = 1,
                 on_change: Callable[["AliasWatcher"], None] | None = None, input_shape=None,
                 retry_s: float = 30.0):
        self.registry, self.name, self.alias, self.input_shape = registry, name, alias, input_shape
        self.cache_dir, self.poll_s, self.threads, self.retry_s = cache_dir, poll_s, threads, retry_s
        self.on_change = on_change or (lambda watcher: None)
        self.current: ServedModel | None = None   # read by every request; replaced, never changed
        self.alias_version: int | None = None     # where the alias pointed at the last poll
        self.problem: str | None = "not checked yet"
        self.polls = self.swaps = self.failures = 0
        self.failed: dict[tuple[int, str], str] = {}  # (version, sha256) -> why it was refused
        self.failed_at: dict[tuple[int, str], float] = {}  # (version, sha256) -> time.monotonic() of the last try
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alias-watcher", daemon=True)

    @property
    def ref(self) -> str:
        """What is followed, e.g. 'digits@production' (Lesson 10, §6)."""
        return f"{self.name}@{self.alias}"

    def start(self) -> None:
        """Poll in a background thread until stop() (Lesson 10, §6)."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and wait for the thread (Lesson 10, §9)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_s)
        self.registry.close()

    def poll(self) -> None:
        """Read the alias once; load, verify and swap in a new version it points to (Lesson 10, §6)."""
        try:
            mv = self.registry.get(self.name, alias=self.alias)
        except NotFoundError as exc:
            self.alias_version, self.problem = None, f"{self.ref} does not exist: {failure_text(exc).split(': ', 1)[1]}"
        except Exception as exc:  # a damaged index, a vanished folder: keep serving, say why
            self.problem = f"cannot read {self.ref}: {failure_text(exc)}"
        else:
            self.alias_version = mv.version
            key = (mv.version, mv.sha256)
            if self.current is not None and (self.current.version, self.current.sha256) == key:
                self.problem = None
            elif key in self.failed and time.monotonic() - self.failed_at[key] < self.retry_s:
                self.problem = self.failed[key]
            else:
                if key in self.failed:
                    print(f"retrying {mv.ref}, which failed verification {self.retry_s:g} s ago", flush=True)
                self._load(mv)
        self.polls += 1
        self.on_change(self)

    def _load(self, mv) -> None:
        try:
            model = load_verified(self.registry, mv.name, mv.version, cache_dir=self.cache_dir, threads=self.threads,
                                  input_shape=self.input_shape)
        except Exception as exc:  # IntegrityError, SignatureError, ExportError...: never served
            key = (mv.version, mv.sha256)
            print(f"{mv.ref} failed verification, not served: {type(exc).__name__}: {exc}", flush=True)
            self.failures += key not in self.failed  # versions refused, not attempts
            self.failed[key] = self.problem = f"{mv.ref} failed verification, not served: {failure_text(exc)}"
            self.failed_at[key] = time.monotonic()
            return
        self.failed.pop((mv.version, mv.sha256), None)
        self.failed_at.pop((mv.version, mv.sha256), None)
        self.current, self.problem = model, None  # the swap: one assignment
        self.swaps += 1

    def status(self) -> dict:
        """What readiness reports: serving, where the alias points, in sync, any problem (Lesson 10, §3).

        `failed`: nothing is served and the alias points to a version that failed to load; it stays so
        until the alias moves or a retry (every `retry_s`) passes.
        """
        current = self.current
        return {"ready": current is not None, "alias": self.ref, "alias_version": self.alias_version,
                "serving_version": None if current is None else current.version,
                "in_sync": current is not None and current.version == self.alias_version,
                "problem": self.problem, "polls": self.polls,
                "failed": current is None and self.problem is not None and self.problem in self.failed.values()}
