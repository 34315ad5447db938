"""bridgecancel.dask against a real local Dask cluster of worker processes.

The cluster (a scheduler and 2 worker processes with 1 thread each, on 127.0.0.1) runs in
a child process started once for this module, so its workers, and the workers the nannies
restart after the crash test, are grandchildren the leak check does not count; the client
and its threads are made (and warmed up) before any test's leak snapshot.
Tasks report to the test over loopback TCP, so the tests wait on events, not sleeps.
The demo's cluster row runs the demo's private case (`bridgecancel._demo.cluster`), which
has no public surface but ``python -m bridgecancel demo``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import distributed  # in the test dependency group: these tests never skip
import pytest

import bridgecancel
from bridgecancel import BrokenWorkerError, blocking, current_token
from bridgecancel.dask import run_on_cluster

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio

_CLUSTER_SCRIPT = """
import sys
from distributed import LocalCluster
if __name__ == "__main__":
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    # The workers import the tasks below from this module, as pytest does.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER_SCRIPT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        with distributed.Client(address) as dask_client:
            # Warm up: the plugins, and the threads the client starts on first use.
            anyio.run(run_on_cluster, dask_client, _add, 1, 2)
            yield dask_client
    finally:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck cluster
            process.kill()
            process.wait()
        process.stdout.close()


# -- tasks (run on the workers) ----------------------------------------------------------


def _add(a: int, b: int) -> int:
    return a + b


def _report(port: int, message: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(message.encode() + b"\n")
    return conn


def _wait_for_cancel(port: int) -> str:
    """Tell the test it started (and where), wait on the token, tell how it stopped."""
    token = current_token()
    worker = distributed.get_worker().address
    with _report(port, f"started {worker}"):
        pass
    started = time.monotonic()
    fired = token.wait(30)
    with _report(port, f"stopped fired={fired} after={time.monotonic() - started:.3f}"):
        pass
    token.check()
    return "not cancelled"


def _blocked_in_queue_get(port: int) -> None:
    """Blocked in a token-aware queue wait, with an on_cancel callback registered."""
    token = current_token()
    token.on_cancel(lambda: _report(port, "callback ran").close())
    with _report(port, "started"):
        pass
    try:
        blocking.queue_get(queue.Queue())  # nothing is ever put: only the cancel ends it
    finally:
        with _report(port, f"stopped fired={token.cancel_called}"):
            pass


def _secede_then_wait(port: int) -> str:
    """A long-running task: it leaves the worker's thread pool, then waits."""
    distributed.secede()
    return _wait_for_cancel(port)


def _ignore_token(port: int) -> tuple[int, bool]:
    """Run to the end whatever the token says: until the test sends "go"."""
    with _report(port, "started") as conn:
        conn.recv(16)
    return 42, current_token().cancel_called


def _crash(port: int) -> None:
    with _report(port, "started"):
        pass
    os._exit(3)


def _fail_first_time(marker: str) -> str:
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("first attempt")
    return "second attempt"


def _raise_value_error() -> None:
    raise ValueError("raised on the worker")


async def _async_add(a: int, b: int) -> int:
    return a + b


def _token_facts() -> tuple[str, bool, float]:
    token = current_token()
    return type(token).__name__, token.cancel_called, token.remaining()


# -- helpers -----------------------------------------------------------------------------


class _Reports:
    """Lines the tasks send to the test, with their connections."""

    def __init__(self, port: int, receive: Any) -> None:
        self.port = port
        self._receive = receive

    def pending(self) -> list[str]:
        """The lines received and not read yet."""
        lines = []
        while True:
            try:
                lines.append(self._receive.receive_nowait()[0])
            except anyio.WouldBlock:
                return lines

    async def next(self) -> tuple[str, anyio.abc.SocketStream]:
        with anyio.fail_after(20):
            line, stream = await self._receive.receive()
        return str(line), stream


@asynccontextmanager
async def _reports() -> AsyncIterator[_Reports]:
    send, receive = anyio.create_memory_object_stream[tuple[str, Any]](100)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                data += await stream.receive()
            await send.send((data.decode().strip(), stream))
            await anyio.sleep_forever()  # the test may still write to it

    async with listener, send, receive, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle, group)
        yield _Reports(port, receive)
        group.cancel_scope.cancel()


def _scheduler_address(client: distributed.Client) -> str:
    """Where `client`'s scheduler listens, for a second client of the same cluster."""
    assert client.scheduler is not None  # a connected client
    address = client.scheduler.address
    assert isinstance(address, str)
    return address


async def _wait_for_workers(client: distributed.Client, count: int) -> None:
    await anyio.to_thread.run_sync(lambda: client.wait_for_workers(count, timeout=30))


# -- tests -------------------------------------------------------------------------------


def test_import_bridgecancel_does_not_import_distributed() -> None:
    code = "import sys, bridgecancel; sys.exit('distributed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


async def test_result_and_token(client: distributed.Client) -> None:
    assert await run_on_cluster(client, _add, 2, 3) == 5
    name, cancel_called, remaining = await run_on_cluster(client, _token_facts)
    assert name == "CancelToken"  # a real token, not the never-cancelled one
    assert not cancel_called
    assert remaining == math.inf


async def test_token_deadline_is_informative(client: distributed.Client) -> None:
    with anyio.fail_after(20):
        _, cancel_called, remaining = await run_on_cluster(client, _token_facts)
    assert not cancel_called
    assert 10 < remaining <= 20  # the caller's deadline (informative: see below)


@pytest.mark.slow
async def test_deadline_pushed_back_never_stops_task(client: distributed.Client) -> None:
    """Only the caller's scope fires the token, never the deadline it had at the start."""
    async with _reports() as reports:
        with anyio.CancelScope(deadline=anyio.current_time() + 1) as scope:
            async with anyio.create_task_group() as group:

                async def push_back_then_cancel() -> None:
                    await reports.next()
                    scope.deadline += 30
                    await anyio.sleep(1.5)  # past the first deadline
                    scope.cancel()

                group.start_soon(push_back_then_cancel)
                await run_on_cluster(client, _wait_for_cancel, reports.port)
        stopped, _ = await reports.next()
    fired_after = float(stopped.split("after=")[1])
    assert fired_after >= 1.4  # by the explicit cancel, not at the first deadline


async def test_cancel_by_scope_stops_task_and_frees_worker(client: distributed.Client) -> None:
    before = bridgecancel.statistics().cluster
    async with _reports() as reports, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                await run_on_cluster(client, _wait_for_cancel, reports.port)

        group.start_soon(call)
        started, _ = await reports.next()
        worker = started.split()[1]
        cancelled_at = time.monotonic()
        scope.cancel()
        stopped, _ = await reports.next()
        assert stopped.startswith("stopped fired=True")
    returned = time.monotonic() - cancelled_at
    assert scope.cancelled_caught
    assert returned < 5
    # The worker's only thread is free: the next task there runs at once.
    with anyio.fail_after(5):
        assert await run_on_cluster(client, _add, 1, 1, workers=[worker]) == 2
    after = bridgecancel.statistics().cluster
    assert after.cooperative == before.cooperative + 1
    assert after.running == 0


async def test_blocking_wait_and_on_cancel_work_in_task(client: distributed.Client) -> None:
    async with _reports() as reports:
        with anyio.move_on_after(20) as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_started() -> None:
                    await reports.next()
                    scope.cancel()

                group.start_soon(cancel_when_started)
                await run_on_cluster(client, _blocked_in_queue_get, reports.port)
        lines = sorted([(await reports.next())[0], (await reports.next())[0]])
    assert scope.cancelled_caught
    assert lines == ["callback ran", "stopped fired=True"]


async def test_cancel_seceded_task(client: distributed.Client) -> None:
    async with _reports() as reports:
        with anyio.move_on_after(20) as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_started() -> None:
                    await reports.next()
                    scope.cancel()

                group.start_soon(cancel_when_started)
                await run_on_cluster(client, _secede_then_wait, reports.port)
        stopped, _ = await reports.next()
    assert scope.cancelled_caught
    assert stopped.startswith("stopped fired=True")


@pytest.mark.slow
async def test_cancel_by_deadline(
    client: distributed.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    async with _reports() as reports:
        with anyio.move_on_after(1.5) as scope:
            await run_on_cluster(client, _wait_for_cancel, reports.port)
        started, _ = await reports.next()
        stopped, _ = await reports.next()
    assert scope.cancelled_caught
    assert started.startswith("started")
    assert stopped.startswith("stopped fired=True")
    assert any(
        "cluster job" in r.getMessage() and "deadline exceeded" in r.getMessage()
        for r in caplog.records
    )


def _report_reason(port: int) -> None:
    """Tell the test it started, wait on the token, tell the token's reason."""
    token = current_token()
    with _report(port, "started"):
        pass
    token.wait(30)
    with _report(port, f"reason={token.reason}"):
        pass
    token.check()


async def test_the_canceller_s_reason_reaches_the_task(client: distributed.Client) -> None:
    # Issue 16, item 1: anyio's CancelScope.cancel(reason=...) reaches the task's token.
    async with _reports() as reports:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_started() -> None:
                    await reports.next()
                    scope.cancel(reason="the user closed the report")

                group.start_soon(cancel_when_started)
                await run_on_cluster(client, _report_reason, reports.port)
        stopped, _ = await reports.next()
    assert scope.cancelled_caught
    assert stopped == "reason=the user closed the report"


async def test_cancel_by_failing_task_group(client: distributed.Client) -> None:
    async with _reports() as reports:
        with pytest.raises(ExceptionGroup) as info:  # noqa: PT012
            async with anyio.create_task_group() as group:

                async def fail_when_started() -> None:
                    await reports.next()
                    raise KeyError("sibling failed")

                group.start_soon(fail_when_started)
                await run_on_cluster(client, _wait_for_cancel, reports.port)
        stopped, _ = await reports.next()
    assert stopped.startswith("stopped fired=True")
    assert [type(e) for e in info.value.exceptions] == [KeyError]


@pytest.mark.slow
async def test_task_ignoring_token_delivers_result(client: distributed.Client) -> None:
    results: list[Any] = []
    async with _reports() as reports, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                results.append(await run_on_cluster(client, _ignore_token, reports.port))
                await anyio.lowlevel.checkpoint()  # the cancellation arrives here
                results.append("not cancelled")

        group.start_soon(call)
        _, stream = await reports.next()
        scope.cancel()
        await anyio.sleep(0.3)
        assert results == []  # the call waits for the task, which runs on
        await stream.send(b"go")
    assert results == [(42, True)]
    assert scope.cancelled_caught


async def test_error_propagates_with_remote_traceback(client: distributed.Client) -> None:
    with pytest.raises(ValueError, match="raised on the worker") as info:
        await run_on_cluster(client, _raise_value_error)
    assert "_raise_value_error" in "".join(traceback.format_tb(info.value.__traceback__))


async def test_retries_rerun_a_task_that_raised(
    client: distributed.Client, tmp_path: Any
) -> None:
    # Dask's retries= is not mistaken for a lost worker (which is never re-run).
    marker = str(tmp_path / "attempted")
    assert await run_on_cluster(client, _fail_first_time, marker, retries=1) == "second attempt"


@pytest.mark.slow
async def test_cancelled_before_start_never_starts(client: distributed.Client) -> None:
    async def block(scope: anyio.CancelScope) -> None:
        with scope:
            await run_on_cluster(client, _wait_for_cancel, reports.port)

    scopes = [anyio.CancelScope(), anyio.CancelScope()]
    async with _reports() as reports, anyio.create_task_group() as group:
        # Both workers' only threads busy, so the third call queues.
        for scope in scopes:
            group.start_soon(block, scope)
        await reports.next()
        await reports.next()
        with anyio.move_on_after(0.3) as queued:
            await run_on_cluster(client, _wait_for_cancel, reports.port)
        assert queued.cancelled_caught
        for scope in scopes:
            scope.cancel()
        lines = [(await reports.next())[0] for _ in range(2)]
        # Give a wrongly started third task time to report, then check it never did.
        await anyio.sleep(0.5)
        lines += reports.pending()
    assert [line.split()[0] for line in lines] == ["stopped", "stopped"], lines


@pytest.mark.slow
async def test_worker_death_is_one_error(client: distributed.Client) -> None:
    async with _reports() as reports:
        with pytest.raises(BrokenWorkerError, match="was lost"):
            await run_on_cluster(client, _crash, reports.port)
        await reports.next()
        await anyio.sleep(0.5)
        assert reports.pending() == []  # it ran once only
    await _wait_for_workers(client, 2)
    assert await run_on_cluster(client, _add, 2, 2) == 4


async def test_bad_input(client: distributed.Client) -> None:
    with pytest.raises(pickle.PicklingError, match="argument 0"):
        await run_on_cluster(client, _add, threading.Lock(), 1)  # type: ignore[arg-type]
    with pytest.raises(pickle.PicklingError, match=r"cannot send .*_add"):
        await run_on_cluster(client, functools.partial(_add, threading.Lock()), 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown option"):
        await run_on_cluster(client, _add, 1, 2, timeout=3)
    with pytest.raises(TypeError, match="async function"):
        await run_on_cluster(client, _async_add, 1, 2)  # type: ignore[unused-coroutine]
    with pytest.raises(TypeError, match=r"distributed\.Client"):
        await run_on_cluster(object(), _add, 1, 2)  # type: ignore[arg-type]
    assert await run_on_cluster(client, _add, 1, 2) == 3  # nothing else affected


async def test_closed_client(client: distributed.Client) -> None:
    other = await anyio.to_thread.run_sync(distributed.Client, _scheduler_address(client))
    await anyio.to_thread.run_sync(other.close)
    with pytest.raises(RuntimeError, match="closed"):
        await run_on_cluster(other, _add, 1, 2)
    assert await run_on_cluster(client, _add, 1, 2) == 3


async def test_client_closed_mid_call_stops_task(client: distributed.Client) -> None:
    other = await anyio.to_thread.run_sync(distributed.Client, _scheduler_address(client))
    try:
        async with _reports() as reports:
            async with anyio.create_task_group() as group:

                async def close_when_started() -> None:
                    await reports.next()
                    await anyio.to_thread.run_sync(other.close)

                group.start_soon(close_when_started)
                with pytest.raises(RuntimeError, match="cancelled outside this call"):
                    await run_on_cluster(other, _wait_for_cancel, reports.port)
            # The worker plugin saw the task's future released and fired its token.
            stopped, _ = await reports.next()
        assert stopped.startswith("stopped fired=True")
    finally:
        await anyio.to_thread.run_sync(other.close)


async def test_second_client_keeps_calls_in_flight(client: distributed.Client) -> None:
    """A new client registering the plugins must not wipe the scheduler's call records."""
    before = bridgecancel.statistics().cluster
    other = await anyio.to_thread.run_sync(distributed.Client, _scheduler_address(client))
    try:
        async with _reports() as reports, anyio.create_task_group() as group:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await run_on_cluster(client, _wait_for_cancel, reports.port)

            group.start_soon(call)
            await reports.next()
            assert await run_on_cluster(other, _add, 1, 1) == 2
            scope.cancel()
            stopped, _ = await reports.next()
        assert stopped.startswith("stopped fired=True")
        # Known to have started (not dropped as never started): it waited for the stop.
        assert bridgecancel.statistics().cluster.cooperative == before.cooperative + 1
    finally:
        await anyio.to_thread.run_sync(other.close)


@pytest.mark.slow
def test_plain_asyncio_with_an_asynchronous_client(client: distributed.Client) -> None:
    """Task.cancel() and wait_for() reach the task, with a Client(asynchronous=True)."""
    import asyncio

    async def main() -> tuple[list[str], int]:
        async with await distributed.Client(
            _scheduler_address(client), asynchronous=True
        ) as async_client, _reports() as reports:
            task = asyncio.ensure_future(
                run_on_cluster(async_client, _wait_for_cancel, reports.port)
            )
            started, _ = await reports.next()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stopped, _ = await reports.next()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    run_on_cluster(async_client, _wait_for_cancel, reports.port), 0.5
                )
            lines = [started, stopped, (await reports.next())[0], (await reports.next())[0]]
            return lines, await run_on_cluster(async_client, _add, 2, 5)

    lines, value = asyncio.run(main())
    assert [line.split()[0] for line in lines] == ["started", "stopped"] * 2
    assert all("fired=True" in line for line in lines[1::2])
    assert value == 7


@pytest.mark.slow
def test_demo_row() -> None:
    # In a child process: the demo starts (and closes) a LocalCluster of its own.
    code = (
        "import json, anyio\n"
        "from bridgecancel._demo.cluster import cluster_cancel\n"
        "print(json.dumps(anyio.run(cluster_cancel, 'trio', backend='trio')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[-1])
    assert list(row) == ["case", "backend", "settings", "bridgecancel", "anchor"]
    assert row["backend"] == "trio"
    assert row["bridgecancel"].startswith("token fired")
    assert row["anchor"].startswith("Future.cancel(): task ran on")
