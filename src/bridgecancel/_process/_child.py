"""The worker process: runs jobs from the pool with a real cancel token.

Standard library only, and never anyio: a worker must start fast. The pool launches
``python -c`` with `_wire.BOOT`, which sets the parent's ``sys.path`` and then runs
``from bridgecancel._process._child import main; main()``: a plain import, since the
package's ``__init__`` loads only the standard-library token names at once.

Three threads of control matter here:

- the main thread reads jobs and runs them, one at a time, with `current_token()` set to
  the job's token;
- the listener thread reads the control pipe: a cancel record fires the job's token (an
  event, so a worker blocked in ``token.wait()`` wakes at once); an interrupt record
  signals the main thread, whose handler raises `Cancelled` in the job's Python code;
  end of file means the parent is gone, and the worker exits even if a job spins;
- signal handlers, which Python runs in the main thread.

Every way out of the process is ``os._exit``: the normal interpreter shutdown never runs
here, since it could wait on a lock a stopped daemon thread holds, or on the job's
atexit handlers, while the parent waits for the call.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import signal
import sys
import threading
import traceback
import types
from typing import Any, Final, NoReturn

from .._timer import report_unraisable
from .._tokens import Cancelled, CancelSource, CancelToken, _current, shield_state
from .._util import describe, describe_error
from . import _wire as wire

__all__ = (
    "load_failure",
    "raised",
    "reason_bytes",
    "returned",
)

INTERRUPT_SIGNAL = signal.SIGUSR1

FAILED_EXIT: Final = wire.FAILED_EXIT
"""The worker's exit status when bridgecancel's own code in it failed (EX_SOFTWARE)."""


class _State:
    """What the listener thread and the signal handler need to know about the job."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job_id = 0  # the job the main thread has taken (0: none yet)
        self.source: CancelSource | None = None  # set while that job runs
        self.busy = False  # from receiving a job until its result is written
        self.pending_cancel: tuple[int, str | None] | None = None  # arrived before its job
        self.interruptible = False  # True only while the job's own code runs
        self.interrupt_job = 0
        self.main_ident = threading.get_ident()
        self.config: wire.Config = {}
        self.res_fd = -1  # the results pipe, for the STARTED message
        self.claim_fd = -1  # the claims pipe: one byte per job, see `_claim`
        self.main_loaded = False
        self.loading_main = False  # guards run_process against an unguarded __main__


_state = _State()


def loading_parent_main() -> bool:
    """True while this worker runs the parent's ``__main__`` to load a function from it."""
    return _state.loading_main


# -- the control listener ----------------------------------------------------------------


def _listen(ctl_fd: int) -> None:
    try:
        while True:
            record = _read_control(ctl_fd)
            if record is None:
                _parent_gone()
            tag, job_id, reason = record
            if tag == wire.CANCEL:
                _cancel(job_id, reason)
            elif tag == wire.INTERRUPT:
                _interrupt(job_id)
    except BaseException as exc:
        # Without this thread nobody would notice the parent dying: never outlive it.
        _fail("the control listener", exc)


def _read_control(ctl_fd: int) -> tuple[int, int, str | None] | None:
    """The next ``(tag, job id, reason)`` record; None once the parent is gone."""
    try:
        head = wire.read_exact(ctl_fd, wire.CONTROL_HEADER.size)
        if head is None:
            return None
        tag, job_id, length = wire.CONTROL_HEADER.unpack(head)
        data = wire.read_exact(ctl_fd, length)
    except OSError:
        return None
    if data is None:
        return None
    return tag, job_id, data.decode("utf-8", "replace") or None


def _cancel(job_id: int, reason: str | None) -> None:
    with _state.lock:
        source = _state.source if job_id == _state.job_id else None
        if source is None:
            if job_id > _state.job_id:  # the main thread has not taken this job yet
                _state.pending_cancel = (job_id, reason)
            return
    try:
        source.cancel(reason)
    except BaseException as exc:  # on_cancel callbacks failed; the job carries on
        report_unraisable(exc, "Exception in on_cancel callback of a process job", source)


def _interrupt(job_id: int) -> None:
    with _state.lock:
        if job_id != _state.job_id or not _state.busy:
            return
        _state.interrupt_job = job_id
    # Aimed at the main thread, so that a blocking call there fails with EINTR and the
    # handler runs now; a process-wide signal might land on a thread that ignores it.
    signal.pthread_kill(_state.main_ident, INTERRUPT_SIGNAL)


def _on_interrupt(signum: int, frame: types.FrameType | None) -> None:
    state = _state
    if state.interruptible and state.interrupt_job == state.job_id:
        source = state.source
        if source is not None:
            state.interrupt_job = 0  # one Cancelled per interrupt
            if _interrupter.holding:  # in a shield() block: raised as it ends
                _interrupter.held = True
                return
            token = source.token
            raise Cancelled._create(token, token.reason)


class _SignalInterrupter:
    """`shield`'s view of the interrupt signal (see `_tokens.Interrupter`): the handler
    runs in the main thread, the job's, between two bytecodes, so plain stores do."""

    holding = False
    held = False

    def hold(self) -> None:
        self.holding = True

    def release(self) -> bool:
        self.holding = False
        due, self.held = self.held, False
        return due


_interrupter = _SignalInterrupter()


def _fail(where: str, exc: BaseException) -> NoReturn:
    """bridgecancel's code in this worker failed: say so on stderr and exit at once.

    The parent sees the result pipe close and raises `BrokenWorkerError` for the call
    (and kills what the job left in the worker's process group).
    """
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(
            f"bridgecancel worker process {os.getpid()}: {where} failed, so the worker "
            f"exits (the call gets BrokenWorkerError):\n{text}",
            file=sys.stderr,
        )
    except BaseException:  # no usable stderr, or the error cannot even be printed
        pass
    _flush_stdio()
    os._exit(FAILED_EXIT)


def _parent_gone() -> NoReturn:
    """The control pipe closed: the parent exited, died, or retired this worker."""
    with _state.lock:
        busy = _state.busy
    if busy and os.getpgrp() == os.getpid():
        # Nobody waits for this job any more: take its children down with us.
        os.killpg(os.getpid(), signal.SIGKILL)
    _flush_stdio()
    os._exit(0)


# -- running jobs ------------------------------------------------------------------------


def _run(
    job_id: int, deadline: float, payload: bytes, source: CancelSource
) -> tuple[int, bytes]:
    """Run one job with `source` (made before the job arrived) as its cancel source."""
    if signal.getsignal(INTERRUPT_SIGNAL) is not _on_interrupt:  # an earlier job replaced it
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
    if deadline != math.inf:
        # The caller's deadline, to read; the caller's scope is what cancels the job.
        source._inform(deadline)
    with _state.lock:
        _state.job_id = job_id
        _state.source = source
        _state.busy = True
        _state.interrupt_job = 0
        pending, _state.pending_cancel = _state.pending_cancel, None
    if pending is not None and pending[0] == job_id:
        source.cancel(pending[1])  # no callbacks registered yet: cannot raise
    reset = _current.set(source.token)
    try:
        return _call(payload, source.token)
    finally:
        _current.reset(reset)
        with _state.lock:
            _state.source = None
        source.close()


def _call(payload: bytes, token: CancelToken) -> tuple[int, bytes]:
    try:
        func, args = _loads(payload)
    except BaseException as exc:
        _claim()  # this job's byte, so that none is left over for the next job
        return wire.LOAD_FAILED, load_failure(exc).encode()
    # Cancelled before it started: it never starts. The parent may have taken the
    # job's claim back already (then its caller is gone), or the cancel may be here.
    if not _claim() or token.cancel_called:
        return wire.CANCELLED, reason_bytes(token)
    state = _state
    try:
        wire.write_all(state.res_fd, wire.result_message(wire.STARTED, state.job_id, b""))
    except OSError:
        pass  # the parent is gone: the listener ends this process
    try:
        try:
            _interrupter.held = False
            shield_state.interrupter = _interrupter
            state.interruptible = True
            if state.interrupt_job == state.job_id:
                raise Cancelled._create(token, token.reason)
            result = func(*args)
        finally:
            state.interruptible = False
            shield_state.interrupter = None
    except Cancelled as exc:
        if token.cancel_called:
            return wire.CANCELLED, reason_bytes(token)
        return raised(func, exc)
    except SystemExit as exc:
        _exit_like(exc)
    except BaseException as exc:
        return raised(func, exc)
    return returned(func, result)


def _claim() -> bool:
    """Take the job's byte from the claims pipe: True if the job may start.

    False if the parent took it back first, for a caller cancelled before the job's
    function began: the caller has left, and the job must never start.
    """
    try:
        return os.read(_state.claim_fd, 1) == b"\0"
    except BlockingIOError:
        return False


def _exit_like(exc: SystemExit) -> NoReturn:
    """A job called sys.exit(): the worker exits with that code, as a script would."""
    code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    _flush_stdio()
    os._exit(status)


# -- unpickling, and functions from the parent's __main__ ---------------------------------


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            _load_parent_main()
        return super().find_class(module, name)


def _loads(payload: bytes) -> Any:
    # Only payloads that mention __main__ need the slower Python-level find_class.
    if b"__main__" in payload:
        return _Unpickler(io.BytesIO(payload)).load()
    return pickle.loads(payload)


def _load_parent_main() -> None:
    """Run the parent's main script as ``__mp_main__``, as multiprocessing's spawn does.

    Done lazily: only a job that needs a function from ``__main__`` pays for it.
    """
    state = _state
    if state.main_loaded:
        return
    import runpy

    name: str | None = state.config.get("main_name")
    path: str | None = state.config.get("main_path")
    if not name and not path:
        raise pickle.UnpicklingError(
            "the function or an argument was defined in the parent's __main__, which has "
            "no file (an interactive session or python -c); define it in a module, or "
            "install cloudpickle (pip install cloudpickle) to send it by value"
        )
    state.loading_main = True
    try:
        if name:
            namespace = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
        else:
            assert path is not None
            namespace = runpy.run_path(path, run_name="__mp_main__")
    finally:
        state.loading_main = False
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    state.main_loaded = True


# -- start-up ------------------------------------------------------------------------------


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _apply_config(config: wire.Config) -> None:
    _state.config = config  # sys.path is the parent's already: `_wire.BOOT` set it


def main() -> NoReturn:
    """Serve jobs until the parent closes the job pipe (or dies); then exit at once."""
    try:
        _serve()
    except BaseException as exc:
        _fail("serving jobs", exc)
    _flush_stdio()
    os._exit(0)


def _serve() -> None:
    job_fd, ctl_fd, res_fd, claim_fd = (int(arg) for arg in sys.argv[1:5])
    fds = (job_fd, ctl_fd, res_fd, claim_fd)
    _state.res_fd = res_fd
    _state.claim_fd = claim_fd
    for fd in fds:  # children the job starts must not hold our pipes open
        os.set_inheritable(fd, False)
    os.set_blocking(claim_fd, False)  # a claim is taken at once or not at all
    os.register_at_fork(after_in_child=lambda: _after_fork_in_child(fds))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {INTERRUPT_SIGNAL})
    signal.signal(INTERRUPT_SIGNAL, _on_interrupt)

    reader = wire.MessageReader(job_fd)
    message = reader.read_job()
    if message is None:
        return
    _apply_config(pickle.loads(message[2]))
    threading.Thread(
        target=_listen, args=(ctl_fd,), name="bridgecancel worker control", daemon=True
    ).start()
    try:
        wire.write_all(res_fd, wire.result_message(wire.READY, wire.CONFIG_JOB_ID, b""))
    except BrokenPipeError:
        return

    while True:
        source = CancelSource()  # made while idle, to keep it off the job's path
        message = reader.read_job()
        if message is None:
            return
        job_id, deadline, payload = message
        tag, body = _run(job_id, deadline, payload, source)
        del payload
        _flush_stdio()
        try:
            wire.write_all(res_fd, wire.result_message(tag, job_id, body))
        except BrokenPipeError:
            return
        with _state.lock:
            _state.busy = False


def _after_fork_in_child(fds: tuple[int, ...]) -> None:
    """In a child the job forks: not a worker. Our pipes are not its; nor is our lock,
    which the listener thread (gone in the child) may have held."""
    _state.lock = threading.Lock()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- results ------------------------------------------------------------------

# What a job's outcome becomes on the results pipe, whatever the job returned or raised.
#
# Each function here returns a ``(tag, payload)`` pair for `_wire.result_message`, and
# turns whatever an odd result or error does into a clear message for the call rather
# than a dead worker.

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
            f"pickled to send it back ({describe_error(exc)}); return "
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
