"""Batching inside the service worker: one onnxruntime run for everything that queued meanwhile.

Requests hand their prepared arrays to a ``Batcher`` and await the rows of the output. When the
model is idle an array is run at once, as a batch of one: no wait is added for a batch to fill.
While the runs in progress take their time, arrays queue; the next run takes every queued array of
the oldest one's shape (up to ``max_batch_size`` arrays and ``max_batch_cost``), so under load
batches grow to what arrived during one run. Up to ``parallel`` runs go on at once, each in a thread
of the batcher's own (onnxruntime releases the GIL, so the event loop keeps parsing and answering
requests meanwhile); ``max_batch_cost`` bounds them together, so a memory bound per run stays the
bound of the worker, and ``max_run_cost`` bounds each (what one session's memory is laid out for).
The queue is bounded: an array that would take it over ``max_queued`` is refused with ``Overloaded``
instead of waiting longer than the client would.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import typing as t
from dataclasses import dataclass

import numpy as np


class Overloaded(RuntimeError):
    """The batcher's queue is full; the request should be retried later (HTTP 503)."""


@dataclass
class _Queued:
    array: np.ndarray
    cost: int
    future: asyncio.Future


class BatchStats:
    """Sizes of the batcher's runs (per worker process), for /info."""

    def __init__(self, keep: int = 256):
        self._lock = threading.Lock()
        self._keep = keep
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.histogram: collections.Counter[int] = collections.Counter()
            self.recent: collections.deque[int] = collections.deque(maxlen=self._keep)

    def record(self, size: int) -> None:
        with self._lock:
            self.histogram[size] += 1
            self.recent.append(size)

    def snapshot(self) -> dict:
        with self._lock:
            runs = sum(self.histogram.values())
            images = sum(size * count for size, count in self.histogram.items())
            return {"runs": runs, "images": images, "max": max(self.histogram, default=0),
                    "mean": images / runs if runs else 0.0,
                    "histogram": {str(size): self.histogram[size] for size in sorted(self.histogram)},
                    "recent": list(self.recent)}


class Batcher:
    """Runs ``run`` (a stacked batch in, one output row per array out) on the arrays submitted.

    ``cost(array)`` counts against ``max_batch_cost`` across the runs in progress, against
    ``max_run_cost`` within one run and against ``max_queued`` in the queue (by default one per array);
    an array whose cost alone exceeds either runs alone. A request is never refused while the queue is
    empty, whatever its cost.
    """

    def __init__(self, name: str, run: t.Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_queued: int,
                 cost: t.Callable[[np.ndarray], int] = lambda array: 1,
                 max_batch_cost: int | None = None, parallel: int = 1, max_run_cost: int | None = None):
        self.name, self._run = name, run
        self.max_batch_size, self.max_queued = max(1, max_batch_size), max_queued
        self._cost, self.max_batch_cost, self.max_run_cost = cost, max_batch_cost, max_run_cost
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queued_cost = 0
        self.parallel = max(1, parallel)
        self._runners = 0  # run loops going (at most ``parallel``)
        self._running_cost = 0  # of the runs in progress
        self._threads = concurrent.futures.ThreadPoolExecutor(self.parallel, thread_name_prefix=f"roadsight-{name}")
        self.stats = BatchStats()

    @property
    def queued(self) -> int:
        """The cost waiting for a run (not counting the run in progress)."""
        return self._queued_cost

    async def submit(self, arrays: t.Sequence[np.ndarray]) -> list[np.ndarray]:
        """The output rows for ``arrays``, in order; ``Overloaded`` if the queue cannot take them all."""
        costs = [self._cost(array) for array in arrays]
        if self._queued_cost and self._queued_cost + sum(costs) > self.max_queued:
            raise Overloaded(f"{self._queued_cost} queued for the {self.name}, at most {self.max_queued}")
        loop = asyncio.get_running_loop()
        items = [_Queued(array, cost, loop.create_future()) for array, cost in zip(arrays, costs)]
        self._queue.extend(items)
        self._queued_cost += sum(costs)
        self._start_runner(loop)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # a cancelled request leaves the queue without being run
                item.future.cancel()

    def _start_runner(self, loop: asyncio.AbstractEventLoop) -> None:
        """Another run loop, when arrays wait and fewer than ``parallel`` loops go on."""
        if self._queue and self._runners < self.parallel:
            self._runners += 1
            loop.create_task(self._run_queue())

    def _take(self) -> list[_Queued]:
        """The next batch: the oldest live array and every queued one of its shape that fits what the
        runs in progress leave of ``max_batch_cost`` and within ``max_run_cost``; nothing while the
        oldest does not fit the first."""
        while self._queue and self._queue[0].future.done():  # its request went away
            self._queued_cost -= self._queue.popleft().cost
        budget = None if self.max_batch_cost is None else self.max_batch_cost - self._running_cost
        if not self._queue or (budget is not None and self._running_cost and self._queue[0].cost > budget):
            return []  # the oldest waits for the runs in progress, and nothing overtakes it
        if self.max_run_cost is not None:
            budget = self.max_run_cost if budget is None else min(budget, self.max_run_cost)
        batch: list[_Queued] = []
        kept: collections.deque[_Queued] = collections.deque()
        for item in self._queue:
            if item.future.done():  # its request went away
                self._queued_cost -= item.cost
                continue
            fits = len(batch) < self.max_batch_size and (
                not batch or (item.array.shape == batch[0].array.shape
                              and (budget is None or item.cost <= budget)))
            if fits:
                batch.append(item)
                self._queued_cost -= item.cost
                if budget is not None:
                    budget -= item.cost
            else:
                kept.append(item)
        self._queue = kept
        return batch

    async def _run_queue(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while batch := self._take():
                cost = sum(item.cost for item in batch)
                self._running_cost += cost
                self.stats.record(len(batch))
                self._start_runner(loop)  # for what this batch left behind
                try:
                    outputs = await loop.run_in_executor(self._threads, self._stack_and_run, [i.array for i in batch])
                except Exception as exc:
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                finally:
                    self._running_cost -= cost
                for item, row in zip(batch, outputs):
                    if not item.future.done():
                        item.future.set_result(row)
        finally:
            self._runners -= 1

    def _stack_and_run(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self._run(np.stack(arrays))  # in the batcher's thread: the copy holds up no request

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
