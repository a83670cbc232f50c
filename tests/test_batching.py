"""The in-worker batcher (serving/batching.py) on a real function of the stacked batch: what each run
takes, in what order, what is refused, and that every request gets its own rows back. A run can be
held (``Gate``) so that what queues meanwhile is known exactly; no test depends on timing."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest

from serving.batching import Batcher, Overloaded


class Gate:
    """A model stand-in: sums each array (so each row identifies its input), records the batch
    sizes it ran, and holds each run until ``release`` while ``hold`` is set."""

    def __init__(self):
        self.runs: list[int] = []
        self.shapes: list[tuple] = []
        self.entered = threading.Semaphore(0)
        self.hold = threading.Event()
        self.go = threading.Semaphore(0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.runs.append(len(batch))
        self.shapes.append(batch.shape[1:])
        self.entered.release()
        if self.hold.is_set():
            self.go.acquire(timeout=30)
        return batch.reshape(len(batch), -1).sum(axis=1)

    async def running(self) -> None:
        """Until a run has started (in the batcher's thread)."""
        assert await asyncio.to_thread(self.entered.acquire, timeout=30), "no run started"

    def release(self) -> None:
        self.go.release()


def arrays(*values: int, shape=(2, 2)) -> list[np.ndarray]:
    return [np.full(shape, value, np.int64) for value in values]


@contextlib.asynccontextmanager
async def a_run_in_progress(batcher: Batcher, gate: Gate):
    """A run of one array, held while the block queues more; released (and finished) at its end."""
    gate.hold.set()
    blocker = asyncio.create_task(batcher.submit(arrays(0)))
    await gate.running()
    yield
    await asyncio.sleep(0.05)  # what the block queued reaches the queue
    gate.hold.clear()
    gate.release()
    assert await blocker == [0]


def test_an_idle_batcher_runs_a_request_at_once_and_batches_what_queued_meanwhile():
    async def scenario():
        gate = Gate()
        gate.hold.set()
        batcher = Batcher("test", gate, max_batch_size=32, max_queued=100)
        first = asyncio.create_task(batcher.submit(arrays(1)))
        await gate.running()  # started alone: nothing waited for company
        assert gate.runs == [1]
        later = [asyncio.create_task(batcher.submit(arrays(v))) for v in (2, 3, 4)]
        await asyncio.sleep(0.05)
        assert batcher.queued == 3 and gate.runs == [1]  # queued while the first run is held
        gate.hold.clear()
        gate.release()
        assert await first == [4]
        assert [await task for task in later] == [[8], [12], [16]]  # each request its own row
        assert gate.runs == [1, 3]
        assert batcher.stats.snapshot()["histogram"] == {"1": 1, "3": 1}
        batcher.close()

    asyncio.run(scenario())


def test_batches_stop_at_the_max_batch_size_and_keep_arrival_order():
    async def scenario():
        gate = Gate()
        batcher = Batcher("test", gate, max_batch_size=4, max_queued=100)
        async with a_run_in_progress(batcher, gate):
            waiting = asyncio.create_task(batcher.submit(arrays(*range(1, 11))))  # ten images in one request
        assert await waiting == [4 * v for v in range(1, 11)]
        assert gate.runs == [1, 4, 4, 2]
        batcher.close()

    asyncio.run(scenario())


def test_batching_off_runs_one_array_at_a_time():
    async def scenario():
        gate = Gate()
        batcher = Batcher("test", gate, max_batch_size=1, max_queued=100)
        results = await asyncio.gather(*(batcher.submit(arrays(v)) for v in range(6)))
        assert results == [[4 * v] for v in range(6)] and gate.runs == [1] * 6
        batcher.close()

    asyncio.run(scenario())


def test_a_full_queue_refuses_new_requests_but_never_an_empty_one():
    async def scenario():
        gate = Gate()
        gate.hold.set()
        batcher = Batcher("test", gate, max_batch_size=8, max_queued=5)
        running = asyncio.create_task(batcher.submit(arrays(*range(7))))  # over the bound: admitted, queue empty
        await gate.running()
        queued = asyncio.create_task(batcher.submit(arrays(1, 2, 3, 4, 5)))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="5 queued"):
            await batcher.submit(arrays(6))
        assert batcher.queued == 5  # the refused request left nothing behind
        gate.hold.clear()
        gate.release()
        await running
        assert await queued == [4, 8, 12, 16, 20]
        assert await batcher.submit(arrays(6)) == [24]
        batcher.close()

    asyncio.run(scenario())


def test_different_shapes_never_share_a_run_and_the_cost_budget_holds():
    """The dehazer's rule: same-size images share runs within a pixel budget; others run apart."""
    async def scenario():
        gate = Gate()
        batcher = Batcher("test", gate, max_batch_size=32, max_queued=10_000,
                          cost=lambda array: array.size, max_batch_cost=12)
        async with a_run_in_progress(batcher, gate):
            small = [asyncio.create_task(batcher.submit(arrays(v, shape=(2, 2)))) for v in (1, 2, 3, 4)]
            large = [asyncio.create_task(batcher.submit(arrays(v, shape=(4, 4)))) for v in (5, 6)]
        assert [await task for task in small] == [[4], [8], [12], [16]]
        assert [await task for task in large] == [[80], [96]]  # 16 pixels each: over the budget, alone
        assert list(zip(gate.runs, gate.shapes)) == [(1, (2, 2)), (3, (2, 2)), (1, (2, 2)), (1, (4, 4)), (1, (4, 4))]
        batcher.close()

    asyncio.run(scenario())


def test_each_run_keeps_within_its_own_cost_bound_and_a_larger_array_runs_alone():
    """The dehazer on the CPU: a run takes at most ``max_run_cost`` (what a session's memory is laid
    out for), however much the budget across runs leaves; one array over it still runs, alone."""
    async def scenario():
        gate = Gate()
        batcher = Batcher("test", gate, max_batch_size=32, max_queued=10_000,
                          cost=lambda array: array.size, max_batch_cost=100, max_run_cost=8)
        async with a_run_in_progress(batcher, gate):
            small = [asyncio.create_task(batcher.submit(arrays(v, shape=(2, 2)))) for v in (1, 2, 3)]
            large = asyncio.create_task(batcher.submit(arrays(5, shape=(3, 3))))
        assert [await task for task in small] == [[4], [8], [12]] and await large == [45]
        assert list(zip(gate.runs, gate.shapes)) == [(1, (2, 2)), (2, (2, 2)), (1, (2, 2)), (1, (3, 3))]
        batcher.close()

    asyncio.run(scenario())


def test_parallel_runs_start_at_once_and_share_the_cost_budget():
    """Two runs at once (the service's layout on the CPU): a request that finds one run in progress
    starts the second at once; the cost budget bounds both together, and the oldest waiting array
    is not overtaken by a smaller one that would fit."""
    async def scenario():
        gate = Gate()
        gate.hold.set()
        batcher = Batcher("test", gate, max_batch_size=32, max_queued=10_000,
                          cost=lambda array: array.size, max_batch_cost=12, parallel=2)
        first = asyncio.create_task(batcher.submit(arrays(1, shape=(2, 2))))  # 4 of the 12
        await gate.running()
        second = asyncio.create_task(batcher.submit(arrays(2, shape=(2, 3))))  # 6 more, beside it
        await gate.running()
        large = asyncio.create_task(batcher.submit(arrays(3, shape=(2, 4))))  # 8: only 2 left
        small = asyncio.create_task(batcher.submit(arrays(4, shape=(1, 2))))  # 2 would fit
        await asyncio.sleep(0.05)
        assert gate.runs == [1, 1] and batcher.queued == 10  # both wait while the two runs hold 10
        gate.hold.clear()
        gate.release()
        gate.release()
        assert [await first, await second, await large, await small] == [[4], [12], [24], [8]]
        assert gate.runs == [1, 1, 1, 1] and batcher.queued == 0
        batcher.close()

    asyncio.run(scenario())


def test_a_request_that_went_away_is_not_run():
    async def scenario():
        gate = Gate()
        batcher = Batcher("test", gate, max_batch_size=32, max_queued=100)
        async with a_run_in_progress(batcher, gate):
            abandoned = asyncio.create_task(batcher.submit(arrays(1, 2)))
            kept = asyncio.create_task(batcher.submit(arrays(3)))
            await asyncio.sleep(0.05)
            abandoned.cancel()
        assert await kept == [12] and gate.runs == [1, 1]
        assert batcher.queued == 0
        batcher.close()

    asyncio.run(scenario())


def test_a_failing_run_fails_its_requests_only():
    def run(batch):
        if (batch < 0).any():
            raise RuntimeError("model failed")
        return batch.reshape(len(batch), -1).sum(axis=1)

    async def scenario():
        batcher = Batcher("test", run, max_batch_size=1, max_queued=100)
        good, bad, after = await asyncio.gather(batcher.submit(arrays(1)), batcher.submit(arrays(-1)),
                                                batcher.submit(arrays(2)), return_exceptions=True)
        assert good == [4] and after == [8]
        assert isinstance(bad, RuntimeError) and str(bad) == "model failed"
        batcher.close()

    asyncio.run(scenario())
