"""pytest plugin for .ci/starlette_conformance.py, loaded into Starlette's own test suite.

``BRIDGECANCEL_WRAP=1``: every app handed to Starlette's ``TestClient`` or to httpx's
``ASGITransport`` (httpx and httpx2, where installed) is wrapped in
`CancelOnDisconnectMiddleware`. The wrap is made where the app reaches the transport that
calls it, so the test code, the app and what ``TestClient.app`` returns are unchanged.

``BRIDGECANCEL_OUTCOMES=FILE``: each test's outcome (``passed``, ``failed``, ``skipped``,
``xfailed``...; a failure in setup or teardown counts as ``error``) and the one-line
reason of a failure are written to FILE as JSON at the end of the session.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

_outcomes: dict[str, dict[str, str]] = {}


def _wrap_app_argument(cls: Any, attribute: str) -> None:
    """After ``cls.__init__``, wrap the instance's `attribute` (the app) in the middleware."""
    from bridgecancel.asgi import CancelOnDisconnectMiddleware

    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        app = getattr(self, attribute)
        if not isinstance(app, CancelOnDisconnectMiddleware):
            setattr(self, attribute, CancelOnDisconnectMiddleware(app))

    cls.__init__ = __init__


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("BRIDGECANCEL_WRAP") != "1":
        return
    from starlette import testclient

    _wrap_app_argument(testclient._TestClientTransport, "app")
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        _wrap_app_argument(module.ASGITransport, "app")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    seen = _outcomes.get(report.nodeid)
    if seen is not None and seen["outcome"] in ("failed", "error"):
        return  # the first failure of a test is the one to show
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        _outcomes[report.nodeid] = {"outcome": outcome, "why": message.splitlines()[0][:300]}
    elif report.when == "call" or (report.skipped and report.when == "setup"):
        outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        _outcomes[report.nodeid] = {"outcome": outcome, "why": ""}


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("BRIDGECANCEL_OUTCOMES")
    if path:
        Path(path).write_text(json.dumps(_outcomes, indent=1, sort_keys=True))
