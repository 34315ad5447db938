"""Cancel blocking work in threads and processes from async cancel scopes.

The token names are loaded at once (standard library only, so worker processes and code
that only uses tokens start fast); the names backed by anyio, and `ThreadPoolExecutor`
(which loads ``concurrent.futures`` and ``logging``), are loaded the first time they are
used (PEP 562).
"""

import typing as _typing

from ._exceptions import BrokenWorkerError as BrokenWorkerError
from ._exceptions import RemoteTraceback as RemoteTraceback
from ._tokens import Cancelled as Cancelled
from ._tokens import CancelSource as CancelSource
from ._tokens import CancelToken as CancelToken
from ._tokens import Registration as Registration
from ._tokens import any_of as any_of
from ._tokens import check_cancelled as check_cancelled
from ._tokens import current_token as current_token
from ._tokens import shield as shield
from ._tokens import use_token as use_token

if _typing.TYPE_CHECKING:
    from ._executor import ThreadPoolExecutor as ThreadPoolExecutor
    from ._iterate import iterate as iterate
    from ._process._run import current_default_process_limiter as current_default_process_limiter
    from ._process._run import run_process as run_process
    from ._scopes import cancel_on as cancel_on
    from ._scopes import open_token as open_token
    from ._supervise import JobStatistics as JobStatistics
    from ._supervise import Statistics as Statistics
    from ._supervise import statistics as statistics
    from ._threads import run_sync as run_sync

__version__ = "0.1.0"

__all__ = (
    "BrokenWorkerError",
    "CancelSource",
    "CancelToken",
    "Cancelled",
    "JobStatistics",
    "Registration",
    "RemoteTraceback",
    "Statistics",
    "ThreadPoolExecutor",
    "any_of",
    "cancel_on",
    "check_cancelled",
    "current_default_process_limiter",
    "current_token",
    "iterate",
    "open_token",
    "run_process",
    "run_sync",
    "shield",
    "statistics",
    "use_token",
)

# Public name -> the private module that defines it, imported on first use.
_LAZY: dict[str, str] = {
    "cancel_on": "._scopes",
    "open_token": "._scopes",
    "current_default_process_limiter": "._process._run",
    "run_process": "._process._run",
    "Statistics": "._supervise",
    "JobStatistics": "._supervise",
    "statistics": "._supervise",
    "run_sync": "._threads",
    "ThreadPoolExecutor": "._executor",
    "iterate": "._iterate",
}


def _publish(obj: _typing.Any) -> _typing.Any:
    """Show a public object as ``bridgecancel.<name>`` in reprs and tracebacks."""
    try:
        obj.__module__ = __name__
    except (AttributeError, TypeError):  # pragma: no cover - every public name allows it
        pass
    return obj


def __getattr__(name: str) -> _typing.Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = _publish(getattr(importlib.import_module(module_name, __name__), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


for _obj in (BrokenWorkerError, Cancelled, RemoteTraceback, CancelSource, CancelToken,
             Registration, any_of, check_cancelled, current_token, shield, use_token):
    _publish(_obj)
del _obj
