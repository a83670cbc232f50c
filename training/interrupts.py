"""Ctrl-C and ``kill`` that stop a training run cleanly and are never lost.

The command line turns SIGINT and SIGTERM into KeyboardInterrupt, so a run ends as KILLED with a
resumable checkpoint. Python raises it wherever the main thread happens to be, and two places are
unsafe during an MLflow run: inside a database commit (CI saw the interrupted commit leave SQLite
locked, so marking the run KILLED then failed) and inside a finalizer (where the exception is only
printed, and the interrupt is gone). So inside ``deferred()`` - the body of every tracked run - the
first signal is only remembered, and the training and evaluation loops raise it at the next step
through ``raise_if_pending``; a second signal stops at once, for a user who will not wait. Under
torchrun every process defers alike and the processes stop together (``distributed.raise_if_interrupted``).
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

_pending: list[int] = []
_deferring = 0


def _interrupt(signum, frame) -> None:
    _pending.append(signum)
    if _deferring and len(_pending) == 1:
        sys.stderr.write(f"\nsignal {signum}: stopping at the next step (send it again to stop now)\n")
        return
    raise KeyboardInterrupt(f"signal {signum}")


def install() -> None:
    """Route SIGINT (Ctrl-C) and SIGTERM (``kill``) here; call from the main thread."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def pending() -> bool:
    """Whether a signal is held (deferred or swallowed) and not raised yet."""
    return bool(_pending)


def raise_if_pending() -> None:
    """Raise, once, the KeyboardInterrupt of a signal that was deferred or swallowed."""
    if _pending:
        signum = _pending[-1]
        _pending.clear()
        raise KeyboardInterrupt(f"signal {signum}")


def clear() -> None:
    """Forget signals whose KeyboardInterrupt has been handled."""
    _pending.clear()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the first signal through this block, and leave it pending: for ending an MLflow run,
    which a KeyboardInterrupt must not cut short (the run would stay RUNNING)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the first signal until the next ``raise_if_pending`` (at the latest, this block's end)."""
    with held():
        yield
    raise_if_pending()
