"""Signal handling, written once: `handling` installs a handler for a block and restores the previous ones.

The behaviours built on it: `stop_requested` (training finishes its step on the first SIGINT/SIGTERM),
`raise_interrupted`, `held_back` and `sigterm_held_back` (tracking ends its MLflow run KILLED, never mid-call;
a stage's outputs are swapped in together) and
`relay_to` (the pipeline wrapper passes SIGTERM on to its child). Python installs handlers in the main thread
only: elsewhere every block here changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from llm.errors import Interrupted

Handler = Callable[[int, FrameType | None], Any]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling(signums: Iterable[int], handler: Handler) -> Iterator[dict[int, Any]]:
    """Within the block `handler` handles `signums`; yields the handlers it replaced (restored when it ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, h)


# Every signal `raise_interrupted` turned into `Interrupted`, in order: library code that catches `Exception` (MLflow's
# model logging does, around its input-example check) can swallow the exception, but not this record.
raised: list[int] = []


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """A handler: raise `Interrupted` for the signal (and record it in `raised`)."""
    raised.append(signum)
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stop_requested() -> Iterator[list[int]]:
    """Within the block the first SIGINT/SIGTERM only sets stop[0] = signal number; a second one raises."""
    stop = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop[0]:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} (second signal, no checkpoint)")
        stop[0] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", file=sys.stderr)

    with handling(STOP_SIGNALS, handler):
        yield stop


@contextmanager
def held_back(signums: Iterable[int]) -> Iterator[None]:
    """Within the block these signals are only recorded; when the block ends the first to arrive goes to the
    handler the block replaced (`raise_interrupted` raises; an enclosing block records it in turn). Signal masks
    would not do: torch's worker threads would take the signal instead."""
    arrived: list[int] = []
    with handling(signums, lambda signum, frame: arrived.append(signum)) as replaced:
        yield
    if not arrived:
        return
    previous = replaced.get(arrived[0])
    if callable(previous):
        previous(arrived[0], None)
    elif previous == signal.SIG_DFL:
        signal.raise_signal(arrived[0])


def sigterm_held_back() -> contextlib.AbstractContextManager[None]:
    """`held_back` for SIGTERM (tracking: a run's MLflow calls are never cut in the middle)."""
    return held_back((signal.SIGTERM,))


@contextmanager
def relay_to(child: list[subprocess.Popen[bytes]], received: list[int]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM are recorded in `received` instead of stopping this process. SIGTERM is
    passed on to the child (child[0], once started); SIGINT is not, as Ctrl-C already reaches it through the
    terminal's process group (a second one would make the stages stop without a checkpoint)."""

    def relay(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if signum == signal.SIGTERM and child:
            child[0].send_signal(signum)

    with handling(STOP_SIGNALS, relay):
        yield
