"""bridgecancel.celery against a real Redis and real ``celery worker`` processes.

Redis comes from ``BRIDGECANCEL_TEST_REDIS_URL`` (``.ci/run`` sets it with
``.ci/redis.sh``), or else from ``.ci/redis.sh --no-install`` started here for the session
(a port and a folder of its own) and stopped when it ends. Only when neither gives a
server, and ``CI`` is not set, are these tests skipped, with a reason that says so; under
CI they fail instead.

Two workers run for the module, started together on loopback: a prefork pool of two
processes and a threads pool of three, each on a queue of its own, named after its pool
and this test session (test suites on other Pythons may share the Redis server). The
tasks, and the app, are in ``_celery_tasks``. Most tests run on both pools and both
backends. The pool processes are the workers' children, so the leak check does not count
them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import celery
import pytest
import redis

import _celery_tasks as tasks
import bridgecancel
from bridgecancel import BrokenWorkerError, RemoteTraceback
from bridgecancel.celery import install, run_on_celery

pytestmark = [
    pytest.mark.anyio,
    # Celery's Redis result backend calls setex(), which redis-py 8.1 (the newest on
    # Python 3.10) deprecates; the test process stores a result when a cancel finds that
    # the task has not started.
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
REDIS_SCRIPT = ROOT / ".ci" / "redis.sh"
PATIENCE = 20.0  # how long to wait for something that should happen at all
SESSION = uuid.uuid4().hex[:8]  # in the queues' names: this session's workers only


# -- Redis -------------------------------------------------------------------------------


def _redis_unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Celery tests, but {reason}", pytrace=False)
    pytest.skip(
        f"Celery tests NOT RUN: {reason}. Install Debian's redis-server package "
        "(apt-get install redis-server) or set BRIDGECANCEL_TEST_REDIS_URL; CI runs them."
    )


def _redis_script(folder: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run .ci/redis.sh for the server whose folder is `folder`."""
    return subprocess.run(
        ["bash", str(REDIS_SCRIPT), *args],
        env={**os.environ, "BRIDGECANCEL_REDIS_DIR": folder},
        capture_output=True, text=True, timeout=120, check=False,
    )


def _check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_timeout=10).ping()
    except redis.RedisError as exc:
        _redis_unavailable(f"no Redis answers at {url!r} ({exc})")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A reachable Redis server: the given one, or one started for this session."""
    given = os.environ.get("BRIDGECANCEL_TEST_REDIS_URL")
    if given:
        _check_redis(given)
        tasks.configure(given)
        yield given
        return
    folder = tempfile.mkdtemp(prefix="bridgecancel-redis.")
    try:
        try:
            result = _redis_script(folder, "--no-install")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _redis_unavailable(f"{REDIS_SCRIPT} could not run ({exc})")
        if result.returncode != 0:
            _redis_unavailable(f"{REDIS_SCRIPT} could not start a server: {result.stderr.strip()}")
        url = result.stdout.strip()
        _check_redis(url)
        tasks.configure(url)
        yield url
    finally:
        stopped = _redis_script(folder, "--stop")
        assert stopped.returncode == 0, f"Redis in {folder} did not stop: {stopped.stderr}"
        shutil.rmtree(folder, ignore_errors=True)


# -- workers -----------------------------------------------------------------------------


class Worker:
    """A ``celery worker`` process for one pool, consuming a queue of its own."""

    def __init__(self, pool: str, concurrency: int, url: str, folder: str) -> None:
        self.pool = pool
        self.queue = f"{pool}-{SESSION}"
        self.name = f"{self.queue}@bridgecancel-tests"
        self.log = Path(folder) / f"{pool}.log"
        here = str(Path(__file__).resolve().parent)
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "_celery_tasks", "worker",
                "-P", pool, "-c", str(concurrency), "-Q", self.queue, "-n", self.name,
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-l", "info", "--logfile", str(self.log),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path, "BRIDGECANCEL_TEST_REDIS_URL": url},
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.log.exists() and " ready." in self.log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the {self.pool} worker did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def stop(self) -> None:
        """Ask for a warm shutdown (running tasks end); `wait` for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck worker
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def workers(redis_url: str) -> Iterator[dict[str, Worker]]:
    folder = tempfile.mkdtemp(prefix="bridgecancel-celery.")
    started = [Worker("prefork", 2, redis_url, folder), Worker("threads", 3, redis_url, folder)]
    try:
        for worker in started:  # started side by side: they get ready together
            worker.wait_ready()
        # Warm up (connections, the caller's threads, the listeners) before any leak check.
        for worker in started:
            anyio.run(run_on_celery, tasks.add.s(1, 2).set(queue=worker.queue))
        yield {worker.pool: worker for worker in started}
    finally:
        for worker in started:  # both at once: a warm shutdown takes a few seconds
            worker.stop()
        for worker in started:
            worker.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["prefork", "threads"])
def pool(request: pytest.FixtureRequest, workers: dict[str, Worker]) -> str:
    """The queue of the prefork or the threads worker (the test sends its tasks there)."""
    return workers[request.param].queue


@pytest.fixture
def prefork(workers: dict[str, Worker]) -> Worker:
    return workers["prefork"]


# -- reports from the tasks --------------------------------------------------------------


class Reports:
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
        with anyio.fail_after(PATIENCE):
            line, stream = await self._receive.receive()
        return str(line), stream


@asynccontextmanager
async def reports() -> AsyncIterator[Reports]:
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
        yield Reports(port, receive)
        group.cancel_scope.cancel()


def _fields(line: str) -> dict[str, str]:
    """``stopped fired=True reason=...`` as a dict (the reason may hold spaces)."""
    head, _, reason = line.partition(" reason=")
    found = dict(part.split("=", 1) for part in head.split()[1:])
    return {**found, "reason": reason}


def _stats() -> bridgecancel.JobStatistics:
    return bridgecancel.statistics().celery


def _alive(pid: int) -> bool:
    """The process runs (a zombie, killed and not reaped yet, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- tests -------------------------------------------------------------------------------


def test_import_bridgecancel_does_not_import_celery() -> None:
    code = "import sys, bridgecancel; sys.exit('celery' in sys.modules or 'redis' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


async def test_result_and_a_real_token(pool: str) -> None:
    before = _stats()
    assert await run_on_celery(tasks.add.s(2, 3).set(queue=pool)) == 5
    own, cancel_called, remaining = await run_on_celery(tasks.token_facts.s().set(queue=pool))
    assert own  # the call's token, not the never-cancelled one
    assert not cancel_called
    assert remaining is None  # no deadline
    after = _stats()
    assert after.completed == before.completed + 2
    assert after.running == 0


async def test_the_token_carries_the_caller_s_deadline(pool: str) -> None:
    with anyio.fail_after(20):
        _, cancel_called, remaining = await run_on_celery(tasks.token_facts.s().set(queue=pool))
    assert not cancel_called
    assert 10 < remaining <= 20  # informative: only the caller's cancel fires the token


@pytest.mark.slow
async def test_a_deadline_pushed_back_never_stops_the_task(workers: dict[str, Worker]) -> None:
    """Only the caller's cancellation fires the token, never the deadline it had at the
    start."""
    queue = workers["threads"].queue
    async with reports() as lines:
        with anyio.CancelScope(deadline=anyio.current_time() + 1) as scope:
            async with anyio.create_task_group() as group:

                async def push_back_then_cancel() -> None:
                    await lines.next()
                    scope.deadline += 30
                    await anyio.sleep(1.5)  # past the first deadline
                    scope.cancel()

                group.start_soon(push_back_then_cancel)
                await run_on_celery(tasks.wait_for_cancel.s(lines.port).set(queue=queue))
        stopped, _ = await lines.next()
    assert float(_fields(stopped)["after"]) >= 1.4  # by the explicit cancel, not at 1 s


async def test_the_caller_s_cancel_reaches_the_token_with_its_reason(pool: str) -> None:
    before = _stats()
    async with reports() as lines, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                await run_on_celery(tasks.wait_for_cancel.s(lines.port).set(queue=pool))

        group.start_soon(call)
        started, _ = await lines.next()
        assert started.startswith("started")
        cancelled_at = time.monotonic()
        scope.cancel(reason="the user closed the report")
        stopped, _ = await lines.next()
    returned = time.monotonic() - cancelled_at
    assert scope.cancelled_caught
    assert _fields(stopped) == {
        "fired": "True", "after": _fields(stopped)["after"], "reason": "the user closed the report"
    }
    assert returned < 5
    after = _stats()
    assert after.cooperative == before.cooperative + 1
    assert after.running == 0


async def test_blocking_waits_and_on_cancel_callbacks_work_in_the_task(pool: str) -> None:
    async with reports() as lines:
        with anyio.move_on_after(PATIENCE) as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_started() -> None:
                    await lines.next()
                    scope.cancel()

                group.start_soon(cancel_when_started)
                await run_on_celery(tasks.blocked_in_queue_get.s(lines.port).set(queue=pool))
        got = sorted([(await lines.next())[0], (await lines.next())[0]])
    assert scope.cancelled_caught
    assert got == ["callback ran", "stopped fired=True"]


@pytest.mark.slow
async def test_a_deadline_reaches_the_token_as_deadline_exceeded(
    pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    async with reports() as lines:
        with anyio.move_on_after(1) as scope:
            await run_on_celery(tasks.wait_for_cancel.s(lines.port).set(queue=pool))
        await lines.next()
        stopped, _ = await lines.next()
    assert scope.cancelled_caught
    assert _fields(stopped)["reason"] == "deadline exceeded"
    assert any(
        "celery job" in r.getMessage() and "deadline exceeded" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.slow
async def test_a_task_cancelled_while_reserved_by_a_worker_never_starts(
    pool: str, workers: dict[str, Worker]
) -> None:
    before = _stats()
    slots = 2 if pool.startswith("prefork") else 3
    queued_id = f"queued-{uuid.uuid4()}"
    scopes = [anyio.CancelScope() for _ in range(slots)]

    async def block(scope: anyio.CancelScope) -> None:
        with scope:
            await run_on_celery(tasks.wait_for_cancel.s(lines.port).set(queue=pool))

    async with reports() as lines, anyio.create_task_group() as group:
        for scope in scopes:  # every slot of the pool busy: the next task waits
            group.start_soon(block, scope)
        for _ in scopes:
            await lines.next()
        async with anyio.create_task_group() as inner:
            queued = anyio.CancelScope()

            async def call_queued() -> None:
                with queued:
                    await run_on_celery(
                        tasks.wait_for_cancel.s(lines.port).set(queue=pool, task_id=queued_id)
                    )

            inner.start_soon(call_queued)
            # The worker has taken the message (prefetch): reserved, not running.
            await _wait_until_reserved(workers[pool.split("-")[0]], queued_id)
            cancelled_at = time.monotonic()
            queued.cancel()
        assert time.monotonic() - cancelled_at < 1  # free at once: nothing runs
        assert queued.cancelled_caught
        for scope in scopes:
            scope.cancel()
        got = [(await lines.next())[0] for _ in scopes]
        # The freed slots would start the queued task now if it could: give it the time.
        await anyio.sleep(1)
        got += lines.pending()
    assert [line.split()[0] for line in got] == ["stopped"] * slots, got
    result = tasks.app.AsyncResult(queued_id)
    assert await anyio.to_thread.run_sync(lambda: result.state) == "REVOKED"
    after = _stats()
    assert after.never_started == before.never_started + 1
    assert after.cooperative == before.cooperative + slots


async def _wait_until_reserved(worker: Worker, task_id: str) -> None:
    def reserved() -> bool:
        replies = tasks.app.control.inspect(destination=[worker.name], timeout=5).reserved()
        return any(r.get("id") == task_id for r in (replies or {}).get(worker.name, []))

    with anyio.fail_after(PATIENCE):
        while not await anyio.to_thread.run_sync(reserved):
            await anyio.sleep(0.05)


@pytest.mark.slow
async def test_the_call_waits_for_the_task_and_delivers_a_late_result(pool: str) -> None:
    results: list[Any] = []
    async with reports() as lines, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                signature = tasks.ignore_token.s(lines.port).set(queue=pool)
                results.append(await run_on_celery(signature))
                await anyio.lowlevel.checkpoint()  # the cancellation arrives here
                results.append("not cancelled")

        group.start_soon(call)
        _, stream = await lines.next()
        scope.cancel()
        await anyio.sleep(0.5)
        assert results == []  # the call waits for the task, which runs on
        await stream.send(b"go")
    assert results == [[42, True]]  # its token had fired; its result still came back
    assert scope.cancelled_caught


@pytest.mark.slow
async def test_a_task_outside_the_app_s_task_class_is_still_waited_for(pool: str) -> None:
    # Its body cannot get a token, but its call is claimed: a cancel never mistakes it
    # for a task that has not started, and the call waits for it as for any other.
    results: list[Any] = []
    async with reports() as lines, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                signature = tasks.outside_the_app_s_task_class.s(lines.port).set(queue=pool)
                results.append(await run_on_celery(signature))

        group.start_soon(call)
        _, stream = await lines.next()
        scope.cancel()
        await anyio.sleep(0.5)
        assert results == []
        await stream.send(b"go")
    assert results == [False]  # it ran to its end, without a token of its own


@pytest.mark.slow
def test_plain_asyncio_a_cancellation_still_standing_wins(workers: dict[str, Worker]) -> None:
    """Task.cancel() stands though the task returned a value; wait_for() reaches it too."""

    queue = workers["threads"].queue

    async def main() -> list[str]:
        async with reports() as lines:
            task = asyncio.ensure_future(
                run_on_celery(tasks.ignore_token.s(lines.port).set(queue=queue))
            )
            _, stream = await lines.next()
            task.cancel()
            await asyncio.sleep(0.3)
            assert not task.done()  # it waits for the task
            await stream.send(b"go")
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    run_on_celery(tasks.wait_for_cancel.s(lines.port).set(queue=queue)), 1
                )
            return [(await lines.next())[0], (await lines.next())[0]]

    got = asyncio.run(main())
    assert got[0].startswith("started")
    assert _fields(got[1])["fired"] == "True"


async def test_the_task_s_error_arrives_with_its_type(pool: str) -> None:
    with pytest.raises(ValueError, match="raised on the worker") as info:
        await run_on_celery(tasks.raise_value_error.s().set(queue=pool))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in cause.traceback
    with pytest.raises(tasks.CustomError, match="raised on the worker"):
        await run_on_celery(tasks.raise_custom_error.s().set(queue=pool))


@pytest.mark.slow
async def test_a_pool_process_that_dies_fails_that_call_only(prefork: Worker) -> None:
    before = _stats()
    results: list[Any] = []
    async with reports() as lines, anyio.create_task_group() as group:

        async def neighbour() -> None:
            signature = tasks.ignore_token.s(lines.port).set(queue=prefork.queue)
            results.append(await run_on_celery(signature))

        group.start_soon(neighbour)
        _, stream = await lines.next()
        with pytest.raises(BrokenWorkerError, match="died") as info:
            await run_on_celery(tasks.crash.s(lines.port).set(queue=prefork.queue))
        await lines.next()
        await stream.send(b"go")
    assert info.value.exitcode == 3
    assert results == [[42, False]]  # the other process's call was not touched
    assert await run_on_celery(tasks.add.s(2, 2).set(queue=prefork.queue)) == 4  # replaced
    after = _stats()
    assert after.crashed == before.crashed + 1


@pytest.mark.slow
async def test_kill_after_kills_the_pool_process_still_running_the_task(prefork: Worker) -> None:
    before = _stats()
    async with reports() as lines, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                signature = tasks.stuck.s(lines.port).set(queue=prefork.queue)
                await run_on_celery(signature, kill_after=0.5)

        group.start_soon(call)
        started, _ = await lines.next()
        cancelled_at = time.monotonic()
        scope.cancel()
    took = time.monotonic() - cancelled_at
    pid = int(started.split()[1])
    assert scope.cancelled_caught  # a killed task is the caller's cancellation
    assert 0.5 <= took < 3  # not waiting for Celery to notice the process is gone
    assert not _alive(pid)
    after = _stats()
    assert after.killed == before.killed + 1
    assert await run_on_celery(tasks.add.s(3, 4).set(queue=prefork.queue)) == 7  # replaced


@pytest.mark.slow
async def test_a_kill_never_reaches_a_process_that_has_moved_on(prefork: Worker) -> None:
    # Celery's revoke(terminate=True) may signal a pool process that has moved on to
    # another task. A kill for task A, arriving when A's process runs B, must spare B.
    from bridgecancel._celery_worker import task_key, wiring_for

    async with reports() as lines, anyio.create_task_group() as group:
        results: list[Any] = []

        async def hold(name: str) -> None:
            signature = tasks.ignore_token.s(lines.port).set(queue=prefork.queue)
            results.append((name, await run_on_celery(signature)))

        group.start_soon(hold, "other")  # one of the two processes is busy ...
        _, other = await lines.next()
        task_a = f"a-{uuid.uuid4()}"
        pid_a = await run_on_celery(tasks.pid.s().set(queue=prefork.queue, task_id=task_a))
        group.start_soon(hold, "b")  # ... so B runs where A ran
        started_b, stream_b = await lines.next()
        assert int(started_b.split()[1]) == pid_a
        wiring = wiring_for(tasks.app)
        assert wiring is not None
        reply = await anyio.to_thread.run_sync(
            lambda: wiring.script("kill")(keys=[task_key(task_a)], args=[task_a])
        )
        assert reply is not None
        assert int(reply[1]) == 1  # A's process heard the kill
        await anyio.sleep(1.5)  # past the listener's sweep, which re-reads kill requests
        assert _alive(pid_a)
        await stream_b.send(b"go")
        await other.send(b"go")
    assert sorted(results) == [("b", [42, False]), ("other", [42, False])]


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["trio"])  # all on the workers' side: one is enough
async def test_a_cancel_between_attempts_of_a_retried_task(pool: str) -> None:
    async with reports() as lines:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_after_first_attempt() -> None:
                    await lines.next()
                    scope.cancel()

                group.start_soon(cancel_after_first_attempt)
                started = time.monotonic()
                await run_on_celery(tasks.retry_later.s(lines.port, 2.0).set(queue=pool))
        took = time.monotonic() - started
        await anyio.sleep(2.5)  # past the retry's countdown
        got = lines.pending()
    assert scope.cancelled_caught
    # Free once the first attempt has ended, whether the cancel came during it or after
    # it: not when the retry falls due.
    assert took < 1.5
    assert got == []  # the second attempt never ran


async def test_bad_calls_are_refused(workers: dict[str, Worker]) -> None:
    with pytest.raises(TypeError, match="signature"):
        await run_on_celery(tasks.add)
    with pytest.raises(TypeError, match="one task"):
        await run_on_celery(tasks.add.s(1, 2) | tasks.add.s(3))
    with pytest.raises(TypeError, match="one task"):
        await run_on_celery(celery.group(tasks.add.s(1, 2), tasks.add.s(3, 4)))
    with pytest.raises(TypeError, match="kill_after"):
        await run_on_celery(tasks.add.s(1, 2), kill_after="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kill_after"):
        await run_on_celery(tasks.add.s(1, 2), kill_after=-1)
    with pytest.raises(TypeError, match="ignore_result"):
        await run_on_celery(tasks.add.s(1, 2).set(ignore_result=True))
    other = celery.Celery("not_installed", broker="redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match=r"install\(app\)"):
        await run_on_celery(other.signature("some.task"))
    no_backend = celery.Celery("no_backend", broker="redis://127.0.0.1:1/0")
    install(no_backend)
    with pytest.raises(RuntimeError, match="result backend"):
        await run_on_celery(no_backend.signature("some.task"))
    with pytest.raises(ValueError, match="already"):
        install(no_backend, redis_url="redis://127.0.0.1:2/0")
    with pytest.raises(TypeError, match=r"celery\.Celery"):
        install(object())
    assert await run_on_celery(tasks.add.s(1, 2).set(queue=workers["threads"].queue)) == 3


@pytest.mark.slow
def test_the_solo_pool_and_a_worker_that_dies(redis_url: str, tmp_path: Path) -> None:
    # The solo pool runs a task in the worker process itself; if that process dies, no
    # result ever comes: the call notices it is gone and fails with BrokenWorkerError.
    worker = Worker("solo", 1, redis_url, str(tmp_path))
    try:
        worker.wait_ready()

        async def main() -> tuple[str, float]:
            async with reports() as lines:
                with anyio.move_on_after(PATIENCE) as scope:
                    async with anyio.create_task_group() as group:

                        async def cancel_when_started() -> None:
                            await lines.next()
                            scope.cancel(reason="done with it")

                        group.start_soon(cancel_when_started)
                        signature = tasks.wait_for_cancel.s(lines.port).set(queue=worker.queue)
                        await run_on_celery(signature)
                stopped, _ = await lines.next()
                assert scope.cancelled_caught
                async with anyio.create_task_group() as group:

                    async def kill_when_started() -> None:
                        await lines.next()
                        worker.process.kill()

                    group.start_soon(kill_when_started)
                    started = time.monotonic()
                    with pytest.raises(BrokenWorkerError, match="is gone"):
                        await run_on_celery(tasks.stuck.s(lines.port).set(queue=worker.queue))
                return stopped, time.monotonic() - started

        stopped, took = anyio.run(main, backend="trio")
        assert _fields(stopped)["reason"] == "done with it"
        assert took < 15
    finally:
        worker.process.kill()
        worker.process.wait()


@pytest.mark.slow
def test_the_example_runs(redis_url: str) -> None:
    # Its worker consumes Celery's default queue: a database of its own per Python (the
    # suites on other Pythons may share this Redis server), so no other run's worker
    # takes its tasks.
    url = redis_url.rsplit("/", 1)[0] + f"/{sys.version_info.minor % 16}"
    source = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "celery_cancel.py"), "trio"],
        env={**os.environ, "REDIS_URL": url, "PYTHONPATH": source},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "cancelled: True, back after" in out
    assert "the queued call is back at once (cancelled: True)" in out
    assert "its pool process was killed" in out
    assert "the task's error arrives as itself: ValueError('bad input on the worker')" in out
    assert "killed=1" in out
    assert re.search(r"never_started=[1-9]", out)  # the queued call (more, on a slow box)


def test_demo_row_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a redis-server (or without Celery), the demo's row says so and runs nothing.
    import importlib.util

    from bridgecancel._demo import celery_case

    monkeypatch.setattr(shutil, "which", lambda name: None)
    row = anyio.run(celery_case.celery_cancel, "asyncio")
    assert row["bridgecancel"] == row["anchor"] == (
        "not run: no redis-server found (apt-get install redis-server)"
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name: None if name == "celery" else real_find_spec(name),
    )
    row = anyio.run(celery_case.celery_cancel, "trio", backend="trio")
    assert row["bridgecancel"].startswith("not run: install Celery")


@pytest.mark.slow
def test_demo_row(workers: dict[str, Worker]) -> None:
    # In a child process: the demo starts (and stops) a Redis server and a worker of its own.
    code = (
        "import json, anyio\n"
        "from bridgecancel._demo.celery_case import celery_cancel\n"
        "print(json.dumps(anyio.run(celery_cancel, 'trio', backend='trio')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[-1])
    assert list(row) == ["case", "backend", "settings", "bridgecancel", "anchor"]
    assert row["bridgecancel"].startswith("token fired"), row
    assert row["anchor"].startswith("revoke(): task ran on"), row
