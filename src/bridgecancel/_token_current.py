"""The current job's token: `current_token` and `check_cancelled`.

Standard library only. The thread and process workers set `_current` for a job; outside
one, the current token is `_NEVER`, a token that can never fire.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Final

from ._exceptions import Cancelled
from ._token import CancelToken, _new_token

__all__ = ("check_cancelled", "current_token")

_NEVER: Final = _new_token(math.inf, never=True)
_current: ContextVar[CancelToken] = ContextVar("bridgecancel_current_token")


def current_token() -> CancelToken:
    """The running job's token inside a bridgecancel worker (thread or process).

    Anywhere else, a token that is never cancelled, so library code can call
    ``current_token().check()`` unconditionally.
    """
    return _current.get(_NEVER)


def check_cancelled() -> None:
    """Raise `Cancelled` if the current job's token has fired (see `current_token`)."""
    token = _current.get(_NEVER)
    if token.cancel_called:
        raise Cancelled._create(token, token._reason)
