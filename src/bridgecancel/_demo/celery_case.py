"""Demo case: cancel a Celery task, beside what Celery alone does (``revoke()``).

Starts a Redis server of its own (Debian's ``redis-server``, on a free port of
127.0.0.1, keeping nothing on disk) and ``celery worker`` processes loading
`celery_app`, and stops them at the end; ``benchmarks/bench_celery.py`` uses the same
parts. Celery is imported only once the case knows it is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

from .cluster import _receive

__all__ = (
    "JOB_SECONDS",
    "LocalCelery",
    "cancel_with_bridgecancel",
    "cancel_with_celery_alone",
    "celery_cancel",
    "local_celery",
    "missing",
)

CASE: Final = "celery: task waiting on its token"
JOB_SECONDS: Final = 0.5
_PATIENCE: Final = 60.0  # seconds for Redis or a worker to start


def missing() -> str | None:
    """What the case needs and does not find, as the row says it; None if nothing."""
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        return "not run: install Celery (pip install -e '.[celery]' from a checkout)"
    if shutil.which("redis-server") is None:
        return "not run: no redis-server found (apt-get install redis-server)"
    return None


# -- Redis and the workers -----------------------------------------------------------------


class LocalCelery:
    """A Redis server and one ``celery worker`` per ``(pool, concurrency)``, all children of
    this process, and the caller's `app`; `queues` maps each pool to its worker's queue.
    Starting blocks (call it in a thread from async code); `stop` stops them all."""

    def __init__(self, pools: Iterable[tuple[str, int]]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bridgecancel-demo-celery."))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.queues: dict[str, str] = {}
        self.app: Any = None
        try:
            url = self._start_redis()
            from .celery_app import make_app  # only now: Celery is installed

            self.app = make_app(url)
            logs = [self._start_worker(pool, concurrency, url) for pool, concurrency in pools]
            for log, process in zip(logs, self.processes[1:], strict=True):
                _wait_for(functools.partial(_ready, log), process, log)
        except BaseException:
            self.stop()
            raise

    def _start_redis(self) -> str:
        for _ in range(3):  # a free port may be taken before the server binds it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process = subprocess.Popen(
                [
                    "redis-server", "--bind", "127.0.0.1", "--port", str(port),
                    "--dir", str(self.folder), "--save", "", "--appendonly", "no",
                    "--logfile", str(self.folder / "redis.log"),
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                _wait_for(functools.partial(_answers, port), process, self.folder / "redis.log")
            except RuntimeError:
                process.kill()
                process.wait()
                continue
            self.processes.append(process)
            return f"redis://127.0.0.1:{port}/0"
        raise RuntimeError(f"redis-server did not start: {_read(self.folder / 'redis.log')}")

    def _start_worker(self, pool: str, concurrency: int, url: str) -> Path:
        from .celery_app import URL_VARIABLE

        queue = f"demo-{pool}"
        log = self.folder / f"{pool}.log"
        self.processes.append(subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "bridgecancel._demo.celery_app", "worker",
                "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@demo",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-l", "info", "--logfile", str(log),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, URL_VARIABLE: url},
            start_new_session=True,  # its process group: `stop` kills it with its pool
        ))
        self.queues[pool] = queue
        return log

    def stop(self) -> None:
        """Stop the workers, then Redis; remove the folder.

        Each worker runs in a session of its own and is killed with its pool processes:
        every task of the demo has ended by now, and even Celery's cold shutdown takes
        a second and a half.
        """
        if self.app is not None:
            self.app.close()  # its broker connections
        workers, redis_server = self.processes[1:], self.processes[:1]
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in redis_server:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _ready(log: Path) -> bool:
    return " ready." in _read(log)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _PATIENCE
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.stem} did not start; its log: {_read(log)[-2000:]}")
        time.sleep(0.02)


@contextlib.asynccontextmanager
async def local_celery(
    pools: Iterable[tuple[str, int]],
) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    """Start Redis and a worker per ``(pool, concurrency)`` (in a thread: it blocks);
    yield the caller's app and each pool's queue; stop them all."""
    started = await anyio.to_thread.run_sync(LocalCelery, list(pools))
    try:
        yield started.app, started.queues
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(started.stop)


# -- the two sides -------------------------------------------------------------------------


async def cancel_with_bridgecancel(
    app: Any, queue: str, sock: Any, seconds: float
) -> tuple[float, float, float]:
    """Cancel a running `celery_app.WAITING` task by its caller's scope.

    Returns seconds from the cancel to: the task's token firing (as the task saw it
    stop), the caller's return, and the next task starting on the freed pool slot.
    """
    from ..celery import run_on_celery
    from .celery_app import NOW, WAITING

    port = sock.extra(anyio.abc.SocketAttribute.local_port)
    returned = 0.0
    async with anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            nonlocal returned
            with scope:
                await run_on_celery(app.signature(WAITING, (port, seconds), queue=queue))
            returned = time.monotonic()

        group.start_soon(call)
        await _receive(sock, "started")
        cancelled_at = time.monotonic()
        scope.cancel()
        next_started = await run_on_celery(app.signature(NOW, queue=queue))
    stopped = float((await _receive(sock, "stopped")).split()[1])
    return stopped - cancelled_at, returned - cancelled_at, next_started - cancelled_at


async def cancel_with_celery_alone(
    app: Any, queue: str, sock: Any, seconds: float
) -> tuple[float, float]:
    """Celery alone: ``revoke()`` the same running task (Celery's documented cancel; it
    skips a task that has not started, and leaves a running one alone).

    Returns seconds from the revoke to the task's end and to the next task's start.
    """
    from .celery_app import NOW, WAITING

    port = sock.extra(anyio.abc.SocketAttribute.local_port)
    result = await anyio.to_thread.run_sync(
        lambda: app.signature(WAITING, (port, seconds), queue=queue).apply_async()
    )
    await _receive(sock, "started")
    cancelled_at = time.monotonic()
    await anyio.to_thread.run_sync(result.revoke)
    next_started = await anyio.to_thread.run_sync(
        lambda: app.signature(NOW, queue=queue).apply_async().get(timeout=_PATIENCE)
    )
    stopped = float((await _receive(sock, "stopped")).split()[1])
    return stopped - cancelled_at, float(next_started) - cancelled_at


async def celery_cancel(backend: str) -> dict[str, str]:
    """The demo row: one prefork pool process, a task waiting on its token, cancelled
    both ways."""
    row = {
        "case": CASE,
        "backend": backend,
        "settings": f"Redis + celery worker, prefork x 1; task would wait {JOB_SECONDS:g} s",
    }
    why_not = missing()
    if why_not is not None:
        return {**row, "bridgecancel": why_not, "anchor": why_not}
    async with local_celery([("prefork", 1)]) as (app, queues), await anyio.create_udp_socket(
        local_host="127.0.0.1"
    ) as sock:
        queue = queues["prefork"]
        fired, returned, freed = await cancel_with_bridgecancel(app, queue, sock, JOB_SECONDS)
        ran_on, next_started = await cancel_with_celery_alone(app, queue, sock, JOB_SECONDS)
    return {
        **row,
        "bridgecancel": (
            f"token fired {fired * 1e3:.0f} ms after cancel, caller back after "
            f"{returned * 1e3:.0f} ms, next task started after {freed * 1e3:.0f} ms"
        ),
        "anchor": (
            f"revoke(): task ran on {ran_on:.2f} s; next task started after "
            f"{next_started:.2f} s"
        ),
    }
