"""The web examples (examples/web_*.py), run as a user runs them: a server in a subprocess.

Each example prints when its handler starts working and when it stopped because its client
left; the test sends a request, waits for the first line, closes the connection, and waits
for the second. Then the server must still answer a short request.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STARTUP = 30.0  # seconds a server may take to import its framework and listen
PROMPTLY = 5.0  # from the client leaving to the example's "stopped" line (with printing)

# example[:case]: (slow request path, its "working" line, its "stopped" line, a quick request path)
CASES = {
    "web_fastapi": ("/report?rows=600", "report: working", "report: client left", "/report?rows=1"),
    "web_starlette": (
        "/primes?below=1000000000",
        "primes: counting",
        "primes: client left",
        "/primes?below=10",
    ),
    "web_hypercorn_trio": (
        "/wait?seconds=60",
        "wait: waiting",
        "wait: client left",
        "/wait?seconds=0",
    ),
    "web_django": ("/export?rows=600", "export: working", "export: client left", "/export?rows=1"),
    # The same example's sync view, made cancellable: a slow SQLite query through Django.
    "web_django:report": (
        "/report?seconds=60",
        "report: query running",
        "report: client left",
        "/report?seconds=0",
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str, *, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class _Server:
    """An example's server in a subprocess, with its stdout read line by line."""

    def __init__(self, name: str, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(EXAMPLES / f"{name.split(':')[0]}.py"), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="example stdout reader")
        self.reader.start()
        self.port = port

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, "the example's server exited"
                assert time.monotonic() < deadline, "the example's server never listened"
                time.sleep(0.05)

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the example printed no line starting {prefix!r} in {timeout} s")
            if line.startswith(prefix):
                return line

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            self.process.kill()
            self.process.wait()
        self.reader.join()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def example_server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    server = _Server(request.param, _free_port())
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


# Each example is a server started in a subprocess (half a second or more); the quick
# subset (-m "not slow") keeps the one with the lightest framework.
@pytest.mark.parametrize(
    "example_server",
    [
        name if name == "web_starlette" else pytest.param(name, marks=pytest.mark.slow)
        for name in CASES
    ],
    indirect=True,
)
def test_example_stops_its_work_when_the_client_leaves(
    example_server: _Server, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.params["example_server"]
    slow, working, stopped, quick = CASES[name]
    client = socket.create_connection(("127.0.0.1", example_server.port), timeout=10)
    with client:
        client.sendall(
            f"GET {slow} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        example_server.wait_line(working, timeout=10)
    example_server.wait_line(stopped, timeout=PROMPTLY)  # the client has left
    assert _get(example_server.port, quick).startswith(b"HTTP/1.1 200")
