"""A real `bentoml serve serving.service:Roadsight` on a free local port, for the service tests: the
session's shared server (tests/conftest.py) and the start-ups expected to fail. Started the way the
benchmarks start it (benchmarks/server.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.server import ServerFailed, bentoml_serve

__all__ = ["Server", "ServerFailed", "running_server"]


@dataclass
class Server:
    url: str
    models_dir: Path
    log: Path

    def post(self, route: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + route, timeout=60, **kwargs)

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10).json()


@contextlib.contextmanager
def running_server(models_dir: Path, home: Path, settings: dict[str, str] | None = None,
                   ready_within_s: float = 180) -> Iterator[Server]:
    """Serve ``models_dir`` on 127.0.0.1 (extra environment ``settings``, e.g. ROADSIGHT_*) until
    /readyz answers 200; stop the whole process group on exit. ``home`` is its BENTOML_HOME and
    holds its log, server.log."""
    with bentoml_serve(env={"ROADSIGHT_MODELS_DIR": str(models_dir), **(settings or {})},
                       start_timeout_s=ready_within_s, home=home) as running:
        yield Server(running.url, models_dir, running.log)
