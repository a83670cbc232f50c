"""Start a real HTTP server (``bentoml serve`` or the naive uvicorn app) on a free local port, wait
until it answers its readiness route, and stop its whole process group afterwards: for the
benchmarks and for the service tests (tests/live_server.py)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from .common import REPO

QUIET = {"BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log."""


@dataclass
class Running:
    url: str
    pid: int
    started_in_s: float
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(arguments: list[str], env: dict[str, str] | None = None, ready_route: str = "/readyz",
            start_timeout_s: float = 300, home: Path | None = None, cwd: Path = REPO) -> Iterator[Running]:
    """Run ``python <arguments...> --port <free port>`` in ``cwd`` (the repository root) until the block ends.

    ``home`` (default: a temporary folder) is its BENTOML_HOME and holds its output, server.log,
    whose tail ends the ``ServerFailed`` raised if it exits or is not ready within ``start_timeout_s``.
    """
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roadsight-server-")))
        home.mkdir(parents=True, exist_ok=True)
        log = home / "server.log"
        port = free_port()
        started = time.monotonic()
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, *arguments, "--host", "127.0.0.1", "--port", str(port)],
                                       cwd=cwd, env={**os.environ, **QUIET, "BENTOML_HOME": str(home), **(env or {})},
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(process, url + ready_route, log, started + start_timeout_s)
            yield Running(url, process.pid, time.monotonic() - started, log)
        finally:
            _stop(process)


SERVICE = "serving.service:Roadsight"


def bentoml_serve(service: str = SERVICE, env: dict[str, str] | None = None, **options) -> contextlib.AbstractContextManager[Running]:
    """A BentoML service as users run it (``bentoml serve serving.service:Roadsight``); ``options``
    go to :func:`running`."""
    return running(["-m", "bentoml", "serve", service], env, **options)


def _wait_until_ready(process: subprocess.Popen, ready_url: str, log: Path, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with {process.returncode} while starting:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerFailed(f"server not ready at {ready_url} in time:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
