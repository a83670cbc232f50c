"""BentoML's per-request timeout without its memory cost (bentoml 1.4.39, pinned in pyproject.toml).

BentoML's ``TimeoutMiddleware`` schedules a timer for every request and never cancels it, so each
finished request's context (its OpenTelemetry span, futures: about 25 KB) stays referenced until the
timeout has passed. A worker's memory then grows with request rate x timeout before it levels off:
about 100 MB at 35 requests/s with the default 120 s (measured with benchmarks/soak.py). ``install``
puts in its place a subclass that cancels the timer as soon as the response starts or the request
ends, and otherwise answers the same way: a JSON 504 when no response has started in time.
"""
from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # the response started, the request ended, or time ran out
        timer = loop.call_later(self.timeout, self._set_timer_out, started)

        async def send_and_note(message) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, receive, send_and_note))
        handling.add_done_callback(lambda _: started.done() or started.set_result(None))
        try:
            await started
        except asyncio.TimeoutError:
            if handling.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
            return
        finally:
            timer.cancel()
        await handling


def install() -> None:
    """Use ``TimeoutMiddleware`` for the service apps BentoML builds from now on (it looks the class
    up in ``traffic`` each time it builds one)."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
