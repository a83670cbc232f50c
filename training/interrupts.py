"""Ctrl-C and ``kill`` as a KeyboardInterrupt that is never lost.

The command line turns SIGINT and SIGTERM into KeyboardInterrupt, so a training run ends as KILLED
with a resumable checkpoint. Python raises it wherever the main thread happens to be; when that is
a finalizer (a garbage-collection callback of SQLAlchemy's, seen under MLflow logging) it prints
"Exception ignored" and the interrupt is gone. The signal is therefore also remembered, and the
training loops call ``raise_if_pending`` once a step.
"""
from __future__ import annotations

import signal

_pending: list[int] = []


def _interrupt(signum, frame) -> None:
    _pending.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install() -> None:
    """Route SIGINT (Ctrl-C) and SIGTERM (``kill``) here; call from the main thread."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def raise_if_pending() -> None:
    """Raise the KeyboardInterrupt of a signal whose first one was swallowed."""
    if _pending:
        raise KeyboardInterrupt(f"signal {_pending[-1]}")
