"""A real `bentoml serve serving.service:Roadsight` on a free local port, for the service tests: the
session's shared server (tests/conftest.py) and the start-ups expected to fail."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


class ServerFailed(RuntimeError):
    """`bentoml serve` exited or never became ready; the message ends with its log."""


@dataclass
class Server:
    url: str
    models_dir: Path
    log: Path

    def post(self, route: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + route, timeout=60, **kwargs)

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10).json()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(models_dir: Path, home: Path, settings: dict[str, str] | None = None,
                   ready_within_s: float = 180) -> Iterator[Server]:
    """Serve ``models_dir`` on 127.0.0.1 (extra environment ``settings``, e.g. ROADSIGHT_*) until
    /readyz answers 200; stop the whole process group on exit. ``home`` is its BENTOML_HOME and
    holds its log, serve.log."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "serve.log"
    port = free_port()
    env = {**os.environ, "ROADSIGHT_MODELS_DIR": str(models_dir), "BENTOML_HOME": str(home),
           "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1", **(settings or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:Roadsight",
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"bentoml serve exited with {process.returncode} while starting on "
                                   f"{models_dir}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerFailed(f"bentoml serve was not ready within {ready_within_s:.0f} s:\n"
                                   + log.read_text()[-4000:])
            time.sleep(0.5)
        yield Server(url, models_dir, log)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
