"""What a job's outcome becomes on the results pipe, whatever the job returned or raised.

Part of the worker process: standard library only. Each function here returns a
``(kind, payload)`` pair for `_proc_wire.result_message`, and turns whatever an odd
result or error does into a clear message for the call rather than a dead worker.
"""

from __future__ import annotations

import pickle
import traceback
import types

from . import _proc_wire as wire
from ._describe import describe
from ._token import CancelToken

__all__ = ("load_failure", "raised", "reason_bytes", "returned")


def returned(func: object, result: object) -> tuple[int, bytes]:
    """The result message for a job that returned `result`.

    Only a `BaseException` other than `Exception` from pickling it (a KeyboardInterrupt)
    gets out: the worker then fails, as for any error in its own loop.
    """
    if isinstance(result, types.CoroutineType):
        result.close()
        error = TypeError(
            f"{describe(func)} returned a coroutine: run_process runs sync functions; "
            "await async code in the caller instead"
        )
        return raised(func, error)
    try:
        return wire.RETURNED, wire.dumps(result)
    except Exception as exc:
        return wire.SEND_FAILED, (
            f"the result of {describe(func)}, a {type(result).__qualname__}, could not be "
            f"pickled to send it back ({wire.describe_pickling_error(exc)}); return "
            "something picklable (plain data, or a class defined at module level)"
        ).encode()


def raised(func: object, exc: BaseException) -> tuple[int, bytes]:
    """The result message for a job that raised `exc`. Never raises.

    Whatever the exception does when pickled or printed (even a ``__str__`` that raises,
    or a ``__reduce__`` that raises ``KeyboardInterrupt``), the worker stays up and the
    call gets a clear error.
    """
    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as error:
        tb_text = f"(the traceback could not be formatted: {describe_error(error)})"
    try:
        data = wire.dumps((exc, tb_text))
        pickle.loads(data)  # the parent must be able to load it too
    except BaseException as error:
        return wire.SEND_FAILED, (
            f"{describe(func)} raised {describe_error(exc)}, which could not be pickled to send "
            f"it back ({describe_error(error)}); make the exception picklable (keep its "
            "__init__ arguments in .args)\n\n"
            f"Remote traceback:\n{tb_text}"
        ).encode("utf-8", "replace")
    return wire.RAISED, data


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for an error, even one whose ``__str__`` raises."""
    try:
        text = str(exc)
    except BaseException as error:
        text = f"<str() failed with {type(error).__qualname__}>"
    return f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__


def reason_bytes(token: CancelToken) -> bytes:
    """The message for a job stopped by its token: the token's reason."""
    return (token.reason or "").encode("utf-8", "replace")


def load_failure(exc: BaseException) -> str:
    """Why a job could not be unpickled, and what to do."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    hint = (
        "define the function (and the classes of its arguments) at module level in a "
        "module the worker can import"
    )
    return f"the worker could not unpickle the job ({text}); {hint}"
