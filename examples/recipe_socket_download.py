"""Recipe: stop a download over a socket by shutting the socket down on cancel.

    python examples/recipe_socket_download.py

Code that reads a socket with plain ``sock.recv()`` (your own, or a client library's)
blocks in C, where no token check reaches it. Register a callback that shuts the socket
down: the blocked ``recv`` returns at once, the code sees the connection end, and
``token.check()`` turns that into ``Cancelled``. ``shutdown()`` is the call that wakes
the reader: on Linux, ``close()`` from another thread does not interrupt a ``recv``
already waiting. The socket is closed afterwards, in the worker, as usual.

``http_get`` does the same for an HTTP download with ``http.client``: it shuts down the
connection's socket.

Code you write yourself can use ``bridgecancel.blocking.recv(sock, n)`` instead, which
wakes on the token without touching the socket.

The download comes from a small server on 127.0.0.1 that sends a chunk every 10 ms, for
ever.
"""

from __future__ import annotations

import http.client
import socket
import time

import anyio
from anyio.abc import SocketStream

from bridgecancel import current_token, run_sync

CHUNK = b"x" * 1024


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or not connected: nothing is waiting on it
        pass


def download(host: str, port: int, received: list[int]) -> bytes:
    """Read everything the server sends; on cancel, shut the socket down and stop.

    `received` gets the running byte count, so the caller can see progress.
    """
    token = current_token()
    data = bytearray()
    with socket.create_connection((host, port)) as sock, token.on_cancel(_shut_down, sock):
        while True:
            try:
                chunk = sock.recv(65536)  # plain recv: as a client library would do it
            except OSError:
                chunk = b""
            if not chunk:
                token.check()  # the end came from our cancel: raise Cancelled
                return bytes(data)  # the server closed the connection: done
            data += chunk
            received.append(len(data))


def http_get(host: str, port: int, path: str, received: list[int]) -> bytes:
    """GET ``http://host:port/path`` with ``http.client``; on cancel, shut its socket down.

    The same idea for an HTTP client: register the shutdown once the connection exists,
    before the request goes out. Reading the body then ends at once, with an error or a
    short read, and ``token.check()`` says whether our cancel caused it.
    """
    token = current_token()
    conn = http.client.HTTPConnection(host, port)
    try:
        conn.connect()
        with token.on_cancel(_shut_down, conn.sock):
            token.check()
            data = bytearray()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                while chunk := response.read1(65536):
                    data += chunk
                    received.append(len(data))
            except (OSError, http.client.HTTPException):
                token.check()  # the socket was shut down by our cancel: raise Cancelled
                raise
            token.check()  # a short body because of our cancel is not a download
            return bytes(data)
    finally:
        conn.close()


async def _serve_forever(stream: SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(CHUNK)
                await anyio.sleep(0.01)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the client went away


async def download_for(seconds: float) -> tuple[bool, int, float]:
    """Download from a local endless server, cancelling after `seconds`.

    Returns whether the scope was cancelled, the bytes received before, and the seconds
    from the cancel to the worker's exit.
    """
    received: list[int] = [0]
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as server:
        server.start_soon(listener.serve, _serve_forever)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(run_sync, download, "127.0.0.1", port, received)
                await anyio.sleep(seconds)
                cancelled_at = time.perf_counter()
                scope.cancel()
        stopped = time.perf_counter() - cancelled_at
        server.cancel_scope.cancel()
    return scope.cancelled_caught, received[-1], stopped


async def main() -> None:
    cancelled, size, stopped = await download_for(0.3)
    print(
        f"download cancelled: {cancelled} after {size} bytes; "
        f"the worker stopped {stopped * 1000:.1f} ms after the cancel"
    )


if __name__ == "__main__":
    anyio.run(main)
