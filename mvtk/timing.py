"""Latency measured fairly: warm-up calls, then the median of alternating timed blocks (Lessons 06 and 07).

Timing one engine now and another a minute later measures the machine's load as much as the engines;
`median_latencies` times several functions in turns, so a change in load hits all of them alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

from mvtk.errors import InvalidArgumentError, check_positive_int

__all__ = ["median_latency", "median_latencies"]


def median_latency(fn: Callable[[], Any], *, repeats: int | None = None, warmup: int = 2,
                   budget_s: float = 0.5) -> float:
    """Median seconds per call of `fn` after `warmup` calls; repeats fit `budget_s` if not given (Lessons 06 and 07)."""
    return median_latencies([fn], repeats=repeats, warmup=warmup, budget_s=budget_s)[0]


def median_latencies(fns: Sequence[Callable[[], Any]], *, repeats: int | None = None, warmup: int = 2,
                     budget_s: float = 0.5, rounds: int = 3) -> list[float]:
    """Median seconds per call of each function, timed in alternating warmed-up blocks (Lessons 06 and 07).

    Each of `rounds` rounds runs every function `warmup` times untimed, then `repeats / rounds` times
    timed, one function after the other: a change in machine load hits all of them alike, and one
    runtime's idle threads (ONNX Runtime's and PyTorch's both spin a while after a call) never
    slow the other's timed calls. Without `repeats`, as many calls as fit `budget_s` (5 to 200 each).
    """
    if not fns or not all(callable(fn) for fn in fns):
        raise InvalidArgumentError(f"fns must be a non-empty list of callables, got {fns!r}")
    check_positive_int(warmup, "warmup")
    check_positive_int(rounds, "rounds")
    if repeats is None:
        first = [_seconds(fn) for fn in fns]
        repeats = int(min(200, max(5, budget_s / max(sum(first), 1e-6))))
    check_positive_int(repeats, "repeats")
    per_round = -(-repeats // rounds)  # ceiling division
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, bucket in zip(fns, times):
            for _ in range(warmup):
                fn()
            bucket.extend(_seconds(fn) for _ in range(per_round))
    return [statistics.median(bucket) for bucket in times]


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
