"""An asyncio load generator (aiohttp, which BentoML already installs): a fixed number of concurrent
clients post real images in a loop for a warm-up and then a measured time window.

The warm-up lasts its given seconds and at least until every client has had one answer, so the
window starts with the server's queue in its steady state (a slow server at high concurrency takes
longer than any fixed warm-up to get there, and its early answers would flatter its latency).
Only requests that finish inside the window count: throughput is their number over the window's
length, latency percentiles are theirs, and anything that is not a 200 is counted as an error by
status (or exception name). When the server has /info, the histograms of the classifier's
onnxruntime batch sizes before and after the window give the batch sizes the window saw. The CPU
time of the client (this process) and of the server's process tree is recorded too: on a machine
with few cores the client's share is not free.
"""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import aiohttp
import numpy as np

from .common import batch_summary, observed_batches, process_tree_cpu_seconds


@dataclass(frozen=True)
class Upload:
    """One request body: a JPEG file in multipart ``field``."""
    field: str
    filename: str
    data: bytes

    def body(self) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field(self.field, self.data, filename=self.filename, content_type="image/jpeg")
        return form


@dataclass
class Outcome:
    started: float
    finished: float
    status: str


async def post(session: aiohttp.ClientSession, url: str, upload: Upload) -> str:
    """The answer's status code, or what went wrong on the client's side ("timeout", the aiohttp
    error's name, e.g. ClientConnectorError for a refused connection)."""
    try:
        async with session.post(url, data=upload.body()) as response:
            await response.read()
            return str(response.status)
    except asyncio.TimeoutError:
        return "timeout"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def _client(session: aiohttp.ClientSession, url: str, uploads: list[Upload], first: int,
                  answered: asyncio.Event, stop: asyncio.Event, outcomes: list[Outcome]) -> None:
    index = first
    while not stop.is_set():
        upload = uploads[index % len(uploads)]
        index += 1
        started = time.perf_counter()
        status = await post(session, url, upload)
        outcomes.append(Outcome(started, time.perf_counter(), status))
        answered.set()


async def _batch_histogram(session: aiohttp.ClientSession, base_url: str) -> collections.Counter | None:
    """The service's observed classifier batch sizes so far (None for a server without /info)."""
    try:
        async with session.get(base_url + "/info") as response:
            if response.status != 200:
                return None
            return observed_batches(await response.json())
    except aiohttp.ClientError:
        return None


def _percentiles_ms(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1),
            "max_ms": round(max(latencies) * 1000, 1)}


async def measure_window(base_url: str, route: str, uploads: list[Upload], concurrency: int, warmup_s: float,
                         window_s: float, server_pid: int | None = None, megapixels_per_request: float = 0.0,
                         timeout_s: float = 120) -> dict:
    """Load ``route`` with ``concurrency`` looping clients, warm up (``warmup_s`` and one answer per
    client), then return the figures of the next ``window_s`` seconds. In-flight requests are waited
    for after the window, so the next measurement starts on an idle server."""
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    answered = [asyncio.Event() for _ in range(concurrency)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        # Asked while idle: a server that handles one request at a time answers /info only after its queue.
        has_info = await _batch_histogram(session, base_url) is not None
        clients = [asyncio.create_task(_client(session, base_url + route, uploads, i, answered[i], stop, outcomes))
                   for i in range(concurrency)]
        await asyncio.sleep(warmup_s)
        await asyncio.gather(*(event.wait() for event in answered))
        window_start = time.perf_counter()
        cpu_before = (time.process_time(), process_tree_cpu_seconds(server_pid))
        batches_before = await _batch_histogram(session, base_url) if has_info else None
        await asyncio.sleep(max(0.0, window_start + window_s - time.perf_counter()))
        window_end = time.perf_counter()
        cpu_after = (time.process_time(), process_tree_cpu_seconds(server_pid))
        stop.set()
        batches_after = await _batch_histogram(session, base_url) if has_info else None
        await asyncio.gather(*clients)
    measured = window_end - window_start
    in_window = [o for o in outcomes if window_start <= o.finished < window_end]
    ok = [o.finished - o.started for o in in_window if o.status == "200"]
    errors = collections.Counter(o.status for o in in_window if o.status != "200")
    result = {"route": route, "concurrency": concurrency, "window_s": round(measured, 2),
              "warmup_s": round(window_start - started, 2),
              "requests_ok": len(ok), "errors": dict(errors), "throughput_rps": round(len(ok) / measured, 2),
              **_percentiles_ms(ok),
              "client_cpu_cores": round((cpu_after[0] - cpu_before[0]) / measured, 2),
              "server_cpu_cores": round((cpu_after[1] - cpu_before[1]) / measured, 2) if server_pid else None}
    if megapixels_per_request:
        result["megapixels_per_s"] = round(len(ok) * megapixels_per_request / measured, 3)
    if batches_before is not None and batches_after is not None:
        result["batch_sizes"] = batch_summary(batches_after - batches_before)
    return result


def run_window(*args, **kwargs) -> dict:
    """``measure_window`` from synchronous code."""
    return asyncio.run(measure_window(*args, **kwargs))
