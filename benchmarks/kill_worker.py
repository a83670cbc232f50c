"""Fault drill (opt-in, not part of `make test`): SIGKILL the service's worker process in the middle
of /classify load and report what the clients saw while BentoML's arbiter started a new one.

    .venv/bin/python -m benchmarks.kill_worker                    # 16 clients: 10 s steady, then 60 s with the kill
    .venv/bin/python -m benchmarks.kill_worker --clients 64 --before 20 --after 90

Starts its own `bentoml serve` (production settings). Prints the status counts (or client exception
names) of a steady window and of the window in which the worker is killed (2 s into it, so requests
are in flight), how long until /readyz answered 200 from a new worker, and writes
benchmarks/results/kill_worker.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

import aiohttp

from .common import RESULTS, command_line, machine, utc_now
from .load import measure_window
from .server import bentoml_serve
from .serving_load import classify_uploads, format_row

KILL_INTO_WINDOW_S = 2.0


async def worker_pid(session: aiohttp.ClientSession, url: str) -> int | None:
    """The pid of the worker answering /info, or None while no worker answers."""
    try:
        async with session.get(url + "/info", timeout=aiohttp.ClientTimeout(total=2)) as response:
            return (await response.json())["runtime"]["worker_pid"] if response.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def kill_and_watch(url: str, delay_s: float, give_up_s: float) -> dict:
    """After ``delay_s``, SIGKILL the worker, then poll until a different worker is ready; the timeline
    of /readyz answers."""
    await asyncio.sleep(delay_s)
    async with aiohttp.ClientSession() as session:
        victim = await worker_pid(session, url)
        os.kill(victim, signal.SIGKILL)
        killed = time.perf_counter()
        timeline, replacement = [], None
        while time.perf_counter() - killed < give_up_s:
            try:
                async with session.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    answer = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                answer = type(exc).__name__
            if not timeline or timeline[-1][1] != answer:
                timeline.append((round(time.perf_counter() - killed, 2), answer))
            if answer == "200" and (replacement := await worker_pid(session, url)) not in (None, victim):
                break
            await asyncio.sleep(0.25)
        recovered = time.perf_counter() - killed
    return {"killed_worker_pid": victim, "new_worker_pid": replacement,
            "ready_again_after_s": round(recovered, 2) if replacement not in (None, victim) else None,
            "readyz_timeline": timeline}


async def drill(url: str, pid: int, clients: int, before_s: float, after_s: float) -> dict:
    uploads = classify_uploads()
    steady = await measure_window(url, "/classify", uploads, clients, 0, before_s, pid)
    during, recovery = await asyncio.gather(measure_window(url, "/classify", uploads, clients, 0, after_s, pid),
                                            kill_and_watch(url, KILL_INTO_WINDOW_S, after_s))
    return {"steady": steady, "with_the_kill": during, "recovery": recovery}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent /classify clients (default 16)")
    parser.add_argument("--before", type=float, default=10, help="seconds of steady load before the kill (default 10)")
    parser.add_argument("--after", type=float, default=60,
                        help=f"seconds of the window with the kill, {KILL_INTO_WINDOW_S:g} s into it (default 60)")
    args = parser.parse_args()
    with bentoml_serve() as server:
        outcome = asyncio.run(drill(server.url, server.pid, args.clients, args.before, args.after))
    result = {"date": utc_now(), "command": command_line("benchmarks.kill_worker"), "machine": machine(),
              "clients": args.clients, **outcome}
    for name in ("steady", "with_the_kill"):
        row = outcome[name]
        print(f"{name:>13}: {row['requests_ok']} x 200, other answers {json.dumps(row['errors'])}, "
              f"slowest {row['max_ms']} ms")
        print(" " * 15 + format_row(row))
    recovery = outcome["recovery"]
    print(f"worker {recovery['killed_worker_pid']} killed; worker {recovery['new_worker_pid']} ready after "
          f"{recovery['ready_again_after_s']} s; /readyz answers (s after the kill, answer): {recovery['readyz_timeline']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kill_worker.json").write_text(json.dumps(result, indent=2) + "\n")
    print("saved", RESULTS / "kill_worker.json")


if __name__ == "__main__":
    main()
