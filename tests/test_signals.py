"""llm.signals: handlers installed for a block and restored after it; stop, hold-back and relay behaviours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from llm.errors import Interrupted
from llm.signals import handling, raise_interrupted, relay_to, sigterm_held_back, stop_requested


def test_first_signal_asks_to_stop_second_raises_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_requested() as stop:
        assert stop == [0]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop == [signal.SIGTERM]
        with pytest.raises(Interrupted, match="second signal") as caught:
            os.kill(os.getpid(), signal.SIGINT)
        assert caught.value.signum == signal.SIGINT
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_held_back_sigterm_reaches_the_outer_handler_when_the_block_ends() -> None:
    reached = []
    with handling((signal.SIGTERM,), raise_interrupted), pytest.raises(Interrupted) as caught, sigterm_held_back():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("end of block")
    assert reached == ["end of block"] and caught.value.signum == signal.SIGTERM


def test_sigterm_is_relayed_to_the_child_sigint_only_recorded() -> None:
    child = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    received: list[int] = []
    with relay_to(child, received):
        os.kill(os.getpid(), signal.SIGINT)
        assert child[0].poll() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert child[0].wait(timeout=30) == -signal.SIGTERM
    assert received == [signal.SIGINT, signal.SIGTERM]


def test_off_the_main_thread_nothing_is_installed() -> None:
    seen = []

    def worker() -> None:
        with handling((signal.SIGTERM,), raise_interrupted) as replaced:
            seen.append((replaced, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [({}, before)]
