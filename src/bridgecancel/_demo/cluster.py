"""Demo case: cancel a task on a local Dask cluster, beside Dask's own ``Future.cancel()``.

Also home of the task the demo and ``benchmarks/bench_dask.py`` send to the workers (an
importable module, so the workers find it by name). The task reports to the caller over
loopback UDP with ``time.monotonic()`` stamps, which are comparable between processes of
one machine (the clock is system-wide on Linux and macOS).
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .._tokens import current_token

if TYPE_CHECKING:
    import distributed

__all__ = ("cluster_cancel", "now", "start_local_cluster", "waiting_task")

CASE = "dask: task waiting on its token"
JOB_SECONDS = 1.0


# -- on the worker -----------------------------------------------------------------------


def waiting_task(port: int, seconds: float) -> bool:
    """Report "started", wait up to `seconds` on the token, report the stop time."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"started", ("127.0.0.1", port))
        token = current_token()
        fired = token.wait(seconds)
        sock.sendto(f"stopped {time.monotonic()!r}".encode(), ("127.0.0.1", port))
    token.check()
    return fired


def now() -> float:
    """When the task started, on the worker (``time.monotonic()``)."""
    return time.monotonic()


# -- on the caller -----------------------------------------------------------------------


def start_local_cluster(workers: int = 1) -> tuple[Any, distributed.Client]:
    """A LocalCluster of `workers` processes with one thread each, and a client (blocking)."""
    dist: Any = importlib.import_module("distributed")  # untyped constructors
    cluster = dist.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=":0",  # a free port: runs side by side never meet
    )
    return cluster, dist.Client(cluster)


@contextlib.asynccontextmanager
async def local_cluster(workers: int = 1) -> AsyncIterator[distributed.Client]:
    """Start a cluster (in a thread: it blocks), yield its client, then close both."""
    cluster, client = await anyio.to_thread.run_sync(start_local_cluster, workers)
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(client.close)
            await anyio.to_thread.run_sync(cluster.close)


async def _receive(sock: Any, expected: str) -> str:
    with anyio.fail_after(30):
        while True:
            data, _ = await sock.receive()
            text = str(data.decode())
            if text.split()[0] == expected:
                return text


async def cancel_with_bridgecancel(
    client: distributed.Client, sock: Any, seconds: float
) -> tuple[float, float, float]:
    """Cancel a running `waiting_task` by its caller's scope.

    Returns seconds from the cancel to: the task's token firing (as the task saw it
    stop), the caller's return, and the next task starting on the freed thread.
    """
    from ..dask import run_on_cluster

    port = sock.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                await run_on_cluster(client, waiting_task, port, seconds)

        group.start_soon(call)
        await _receive(sock, "started")
        cancelled_at = time.monotonic()
        scope.cancel()
        next_started = await run_on_cluster(client, now)
        returned = time.monotonic()
    stopped = float((await _receive(sock, "stopped")).split()[1])
    return stopped - cancelled_at, returned - cancelled_at, next_started - cancelled_at


async def cancel_with_dask_alone(
    client: Any, sock: Any, seconds: float
) -> tuple[float, float]:
    """Dask alone: ``Future.cancel()`` on the same running task.

    Returns seconds from the cancel to the task's end and to the next task's start.
    """
    port = sock.extra(anyio.abc.SocketAttribute.local_port)
    future = client.submit(waiting_task, port, seconds, pure=False)
    await _receive(sock, "started")
    cancelled_at = time.monotonic()
    future.cancel()
    next_future = client.submit(now, pure=False)
    next_started = await anyio.to_thread.run_sync(next_future.result)
    stopped = float((await _receive(sock, "stopped")).split()[1])
    return stopped - cancelled_at, next_started - cancelled_at


async def cluster_cancel(backend: str) -> dict[str, str]:
    """The demo row: one worker thread, a task waiting on its token, cancelled both ways."""
    row = {
        "case": CASE,
        "backend": backend,
        "settings": f"LocalCluster 1 worker x 1 thread; task would wait {JOB_SECONDS:g} s",
    }
    if importlib.util.find_spec("distributed") is None:
        install = "not run: distributed is not installed (pip install -e '.[dask]' from a checkout)"
        return {**row, "bridgecancel": install, "anchor": install}
    async with local_cluster() as client, await anyio.create_udp_socket(
        local_host="127.0.0.1"
    ) as sock:
        fired, returned, freed = await cancel_with_bridgecancel(client, sock, JOB_SECONDS)
        ran_on, next_started = await cancel_with_dask_alone(client, sock, JOB_SECONDS)
    return {
        **row,
        "bridgecancel": (
            f"token fired {fired * 1e3:.0f} ms after cancel, caller back after "
            f"{returned * 1e3:.0f} ms, next task started after {freed * 1e3:.0f} ms"
        ),
        "anchor": (
            f"Future.cancel(): task ran on {ran_on:.2f} s; next task started after "
            f"{next_started:.2f} s"
        ),
    }
