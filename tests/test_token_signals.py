"""Tokens cancelled from signal handlers, at any instant: no deadlock, no runaway nesting.

A repeating interval timer (``setitimer``) sends SIGALRM every 50 µs to a process whose
main thread runs an event loop (asyncio or trio) and uses tokens in every way, while
the handler cancels the very source the main thread is using. Each storm runs in a
subprocess with a timeout, so a hang fails the test rather than the run.
One test counts a token's waiters through its private ``_wait_locks``: no public call
says how many threads wait on a token.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from bridgecancel import CancelSource

SIGNALS = 20_000
STORM_PATIENCE = 50.0  # seconds; a storm takes a few

_STORM = """
import signal, sys, threading, time
import anyio
import bridgecancel
from bridgecancel import Cancelled, CancelSource, any_of

backend, wanted = sys.argv[1], int(sys.argv[2])
current = [CancelSource()]
handled = 0
depth = 0
max_depth = 0

def on_alarm(signum, frame):
    global handled, depth, max_depth
    depth += 1
    max_depth = max(max_depth, depth)
    handled += 1
    current[0].cancel("signal")  # whatever the main thread is doing with it
    depth -= 1

def noop():
    pass

def token_work(source):
    token = source.token
    token.fileno()
    token.wait(0.00002)
    registration = token.on_cancel(noop)
    registration.unregister()
    with token.child(deadline=time.monotonic() + 0.0001) as child:
        child.token.wait(0.0002)
    source.deadline = time.monotonic() + 10
    any_of(token).close()
    try:
        token.sleep(0.00001)
    except Cancelled:
        pass
    source.close()

def worker(token):
    token.wait(0.002)

async def main():
    cancelled = 0
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 50e-6, 50e-6)
    end = time.monotonic() + 40
    try:
        while handled < wanted and time.monotonic() < end:
            for _ in range(20):
                source = CancelSource()
                current[0] = source
                token_work(source)
                cancelled += source.cancel_called
            source = CancelSource()
            current[0] = source
            with bridgecancel.cancel_on(source.token):  # how docs say to cancel async work
                await bridgecancel.run_sync(worker, source.token)
                await anyio.sleep(0)
            source.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    print(handled, max_depth, cancelled, flush=True)

anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.slow
def test_signal_storm_cancelling_tokens_in_use_never_hangs(backend: str) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-c", _STORM, backend, str(SIGNALS)],
            capture_output=True,
            text=True,
            timeout=STORM_PATIENCE,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung: a signal handler deadlocked on a token")
    assert result.returncode == 0, result.stderr[-2000:]
    handled, max_depth, cancelled = (int(n) for n in result.stdout.split())
    assert handled >= SIGNALS
    assert cancelled > 0  # the handler did hit sources in use
    # Handlers return at once, so they rarely nest; 20,000 signals that nested would go
    # thousands deep. A loaded machine (CI runs suites side by side) allows some more.
    assert max_depth < 100


class _Interrupted(Exception):
    pass


def test_a_wait_interrupted_by_a_signal_holds_up_no_other_waiter() -> None:
    source = CancelSource()
    token = source.token

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    woke = threading.Event()

    def wait_then_mark() -> None:
        if token.wait(30):
            woke.set()

    other = threading.Thread(target=wait_then_mark, daemon=True)
    other.start()
    end = time.monotonic() + 5
    while not token._wait_locks and time.monotonic() < end:  # until the other thread waits
        time.sleep(0.001)
    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGUSR2, interrupt)
    try:
        timer = threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGUSR2))
        timer.start()
        with pytest.raises(_Interrupted):
            token.wait(30)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert len(token._wait_locks) == 1  # only the other thread's wait is left
    source.cancel("done")
    other.join(5)
    assert woke.is_set()
    assert len(token._wait_locks) == 0
