"""Soak test (opt-in, not part of `make test`): a real `bentoml serve` with its production settings
under /classify and /dehaze load at a fixed total concurrency for minutes.

    .venv/bin/python -m benchmarks.soak                           # 64 clients (8 of them on /dehaze), 180 s
    .venv/bin/python -m benchmarks.soak --duration 600 --concurrency 64 --dehaze-clients 4

Passes (exit status 0) when every response is a 200 or the documented 503 back-pressure, the
worker that started is the one still serving at the end, and the server's resident memory (all its
processes) grew by at most --max-late-growth-mib over the second half of the measured part (the
first half settles what the load needs beside what the worker laid out at start-up; a leak keeps
growing). Prints status counts, p50/p95/p99 per route and resident memory before/after; writes
benchmarks/results/soak.json with the memory samples.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

import httpx
import psutil

from .common import RESULTS, command_line, machine, utc_now
from .load import measure_window
from .server import bentoml_serve
from .serving_load import classify_uploads, dehaze_uploads, format_row

MiB = 2**20
ALLOWED = {"200", "503"}  # 503 with Retry-After is the service's documented load shedding


def server_rss_mib(pid: int) -> float:
    """Resident memory of `bentoml serve` and every process under it (workers included)."""
    root = psutil.Process(pid)
    resident = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            resident += process.memory_info().rss
    return round(resident / MiB, 1)


async def sample_rss(pid: int, every_s: float, until: float, samples: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    while time.perf_counter() < until:
        samples.append((round(time.perf_counter() - started, 1), server_rss_mib(pid)))
        await asyncio.sleep(every_s)


async def soak(url: str, pid: int, classify_clients: int, dehaze_clients: int, warmup_s: float,
               duration_s: float) -> tuple[list[dict], list[tuple[float, float]]]:
    """Both routes loaded together; the resident memory sampled from the start of the warm-up."""
    hazy, megapixels, _ = dehaze_uploads()
    samples: list[tuple[float, float]] = []
    end = time.perf_counter() + warmup_s + duration_s
    windows = [measure_window(url, "/classify", classify_uploads(), classify_clients, warmup_s, duration_s, pid)]
    if dehaze_clients:
        windows.append(measure_window(url, "/dehaze", hazy, dehaze_clients, warmup_s, duration_s, pid, megapixels))
    *rows, _ = await asyncio.gather(*windows, sample_rss(pid, max(1.0, duration_s / 30), end, samples))
    return rows, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180, help="measured seconds (default 180)")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of load before measuring (default 30)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients in all (default 64)")
    parser.add_argument("--dehaze-clients", type=int, default=8, help="of those, posting to /dehaze (default 8)")
    parser.add_argument("--max-late-growth-mib", type=float, default=32,
                        help="resident memory growth over the second half that fails the soak (default 32)")
    args = parser.parse_args()
    classify_clients = args.concurrency - args.dehaze_clients
    with bentoml_serve() as server:
        worker_before = httpx.get(server.url + "/info", timeout=10).json()["runtime"]["worker_pid"]
        rss_idle = server_rss_mib(server.pid)
        rows, samples = asyncio.run(soak(server.url, server.pid, classify_clients, args.dehaze_clients,
                                         args.warmup, args.duration))
        worker_after = httpx.get(server.url + "/info", timeout=10).json()["runtime"]["worker_pid"]
        ready_after = httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    measured = [rss for at, rss in samples if at >= args.warmup]
    rss_before, rss_middle, rss_after = measured[0], measured[len(measured) // 2], measured[-1]
    statuses = {row["route"]: {"200": row["requests_ok"], **row["errors"]} for row in rows}
    unexpected = {route: {status: n for status, n in counts.items() if status not in ALLOWED}
                  for route, counts in statuses.items()}
    growth, late_growth = round(rss_after - rss_before, 1), round(rss_after - rss_middle, 1)
    passed = (not any(unexpected.values()) and worker_after == worker_before and ready_after
              and late_growth <= args.max_late_growth_mib)
    result = {"date": utc_now(), "command": command_line("benchmarks.soak"), "machine": machine(),
              "clients": {"/classify": classify_clients, "/dehaze": args.dehaze_clients},
              "warmup_s": args.warmup, "duration_s": args.duration, "routes": rows, "statuses": statuses,
              "rss_mib": {"idle": rss_idle, "before": rss_before, "middle": rss_middle, "after": rss_after,
                          "growth": growth, "growth_second_half": late_growth,
                          "peak": max(rss for _, rss in samples), "samples": samples},
              "worker_restarted": worker_after != worker_before, "ready_after": ready_after, "passed": passed}
    for row in rows:
        print(format_row(row))
    print("statuses:", json.dumps(statuses))
    print(f"server RSS: idle {rss_idle} MiB, after warm-up {rss_before} MiB, at the end {rss_after} MiB "
          f"(growth {growth:+} MiB, {late_growth:+} MiB of it in the second half; peak {result['rss_mib']['peak']} MiB)")
    print(f"same worker throughout: {worker_after == worker_before}; ready afterwards: {ready_after}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print("PASSED" if passed else "FAILED", "- saved", RESULTS / "soak.json")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
