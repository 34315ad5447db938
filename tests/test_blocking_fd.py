"""`bridgecancel.blocking`: what is particular to socket and descriptor waits."""

from __future__ import annotations

import gc
import os
import select
import socket

import pytest

from _blocking_harness import (
    Worker,
    socket_pair,
)
from bridgecancel import CancelSource, blocking


def test_recv_on_a_non_blocking_socket_raises_like_recv() -> None:
    a, b = socket_pair()
    with a, b:
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            blocking.recv(a, 10, token=CancelSource().token)


def test_sendall_large_payload_with_a_concurrent_reader() -> None:
    a, b = socket_pair()
    with a, b:
        payload = os.urandom(3_000_000)
        reader = Worker(lambda: _read_all(b))
        blocking.sendall(a, payload, token=CancelSource().token)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
        assert reader.result == payload


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    token = CancelSource().token
    while chunk := blocking.recv(sock, 65536, token=token):
        chunks.append(chunk)
    return b"".join(chunks)


def test_connect_refused_raises_like_connect() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, not listening: refused
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            blocking.connect(sock, address, token=CancelSource().token)


def test_wait_readable_takes_objects_with_fileno() -> None:
    a, b = socket_pair()
    with a, b:
        b.sendall(b"x")
        assert blocking.wait_readable(a, 5, token=CancelSource().token)
        assert blocking.wait_writable(a, 5, token=CancelSource().token)


# -- tokens' descriptors ----------------------------------------------------------------


def test_token_fileno_is_readable_once_cancelled_and_closed_with_the_token() -> None:
    source = CancelSource()
    fd = source.token.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    assert source.token.fileno() == fd  # created once
    source.cancel()
    assert select.select([fd], [], [], 0)[0] == [fd]
    assert select.select([fd], [], [], 0)[0] == [fd]  # stays readable for every waiter
    os.fstat(fd)
    del source
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_token_fileno_of_a_cancelled_token_is_readable_at_once() -> None:
    source = CancelSource()
    source.cancel()
    assert select.select([source.token.fileno()], [], [], 0)[0]
