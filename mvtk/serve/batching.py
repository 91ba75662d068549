"""Request batching: many small requests, one ONNX Runtime call (Lesson 10, §5).

`MicroBatcher.submit` queues one request's rows and awaits its answer. A worker task takes the
first waiting request, then collects more until `max_batch` rows or `max_wait_s` after the first,
and runs them as one batch in a single worker thread, so the event loop keeps reading requests
meanwhile. With `max_batch=1` every request is its own call: the same path, without batching.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from mvtk.errors import check_number, check_positive_int

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """Collect up to `max_batch` rows or `max_wait_s`, then make one call for all of them (Lesson 10, §5).

    `run(arrays)` gets the waiting requests' arrays and returns one result per array (an Exception
    instance fails only that request). `in_flight()`, when given, says how many requests the service
    is answering now: a batch stops waiting once it holds all of them, so a lone client never waits.
    """

    def __init__(self, run: Callable[[Sequence[np.ndarray]], Sequence[Any]], *, max_batch: int = 64,
                 max_wait_s: float = 0.002, in_flight: Callable[[], int] | None = None):
        self.run = run
        self.in_flight = in_flight
        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.max_wait_s = check_number(max_wait_s, "max_wait_s", low=0)
        self.batches = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch-runner")

    async def start(self) -> None:
        """Start the worker task on the running event loop (Lesson 10, §5)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        """Answer what is queued, then stop the worker (Lesson 10, §9)."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, array: np.ndarray) -> Any:
        """Queue one request's rows; return its result when its batch has run (Lesson 10, §5)."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((array, future))
        return await future

    async def _collect(self, first) -> list:
        items, rows = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while rows < self.max_batch:
            if self._queue.empty():
                if self.in_flight is not None and len(items) >= self.in_flight():
                    break  # every request in the service is in this batch: nobody to wait for
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if item is None:  # stop(): finish this batch, then end
                self._queue.put_nowait(None)
                break
            items.append(item)
            rows += len(item[0])
        return items

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while (first := await self._queue.get()) is not None:
            items = await self._collect(first)
            try:
                results = await loop.run_in_executor(self._executor, self.run, [array for array, _ in items])
            except Exception as exc:  # the whole call failed: every request in it hears why
                results = [exc] * len(items)
            self.batches += 1
            for (_, future), result in zip(items, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
