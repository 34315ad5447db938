"""The demo's web case (`bridgecancel._demo.web.web_disconnect`) under its real servers.

Private: the demo's cases are reached only through ``python -m bridgecancel demo``
(test_demo.py runs that whole), so its web row is checked by calling the case directly.
"""

from __future__ import annotations

import sys

import anyio
import pytest

from bridgecancel._demo.web import WORK_SECONDS, web_disconnect

ROW_KEYS = ("case", "backend", "settings", "bridgecancel", "anchor")


@pytest.mark.slow
def test_web_case_row_shows_the_thread_stopped_beside_the_anchor(anyio_backend: str) -> None:
    row = anyio.run(web_disconnect, anyio_backend, backend=anyio_backend)
    assert tuple(row) == ROW_KEYS
    assert row["backend"] == anyio_backend
    server = "hypercorn (trio worker)" if anyio_backend == "trio" else "uvicorn"
    assert row["settings"].startswith(server)
    assert "thread stopped" in row["bridgecancel"]
    assert row["bridgecancel"].endswith("no thread left")
    stopped = row["bridgecancel"].split("thread stopped ")[1].split(" after")[0]
    assert stopped.endswith(" ms")  # within a second of the client leaving
    ran_on = row["anchor"].split("ran on ")[1].split(" after")[0]
    assert ran_on.endswith(" s")
    assert float(ran_on[:-2]) > WORK_SECONDS / 2  # the anchor's thread ran on


def test_web_case_without_the_server_says_how_to_install_it(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = "hypercorn" if anyio_backend == "trio" else "uvicorn"
    monkeypatch.setitem(sys.modules, server, None)  # makes `import <server>` fail
    row = anyio.run(web_disconnect, anyio_backend, backend=anyio_backend)
    assert tuple(row) == ROW_KEYS
    assert f"{server} is not installed" in row["bridgecancel"]
    assert ".[web]" in row["bridgecancel"]
