"""`Registration`: a callback registered on a token, and the kinds a token files them under.

Standard library only. A registration is a key in its token's callbacks dict: whoever
pops it from there (the firer, `unregister`, or `on_cancel` itself) runs or drops it,
exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

from ._compat import Self

if TYPE_CHECKING:
    from ._token import CancelToken

__all__ = ("FOLLOWER", "INLINE", "USER", "LeftOnExit", "Registration")

# What `on_cancel` registrations are, as values in a token's callbacks dict.
USER: Final = 1  # a user's callback: with `_cancel_detached`, runs in the runner thread
INLINE: Final = 2  # bridgecancel's own quick, non-blocking wake-up: runs in the canceller
FOLLOWER: Final = 3  # a child or `any_of` source: fires in the same way as this token


class LeftOnExit:
    """A context manager whose exit calls `_leave` (unregister, close), and no more."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._leave()

    def _leave(self) -> object:
        raise NotImplementedError


@final
class Registration(LeftOnExit):
    """A callback registered with `CancelToken.on_cancel`.

    Use it as a context manager to unregister on exit, or call `unregister`.
    """

    __slots__ = ("_args", "_fn", "_token", "__weakref__")

    def __init__(
        self, token: CancelToken | None, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._token = token  # None once it ran, is running, or was unregistered
        self._fn = fn
        self._args = args

    def unregister(self) -> bool:
        """Stop the callback from running.

        Returns:
            True only if this call stopped it; False if it already ran, is running
            now, or was unregistered before.
        """
        token = self._token
        if token is None:
            return False
        # Whoever pops a registration from the dict runs or drops it: exactly once.
        if not token._callbacks.pop(self, 0):
            return False
        self._token = None
        return True

    _leave = unregister
