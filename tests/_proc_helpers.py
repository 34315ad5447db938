"""Functions the process tests run in worker processes (they must be importable there).

Workers report progress through marker files, written whole (write, then rename), so a
test can wait for "the job has started" without sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bridgecancel import current_token


def mark(path: str, text: str = "") -> None:
    """Create `path` holding `text`, atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add(a: int, b: int) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def echo(value: object) -> object:
    return value


def wait_for_cancel(started: str) -> str:
    """Cooperative: wait on the token, then raise Cancelled."""
    mark(started, str(os.getpid()))
    current_token().wait()
    current_token().check()
    return "not reached"


def wait_then_return(started: str) -> str:
    """Cooperative but returns a value after the cancel (nothing may be lost)."""
    mark(started, str(os.getpid()))
    current_token().wait()
    return f"cleaned up: {current_token().reason}"


def wait_then_raise(started: str) -> str:
    mark(started, str(os.getpid()))
    current_token().wait()
    raise ValueError("failed while cleaning up")


def sleep_on_token(started: str, seconds: float) -> str:
    mark(started, str(os.getpid()))
    current_token().sleep(seconds)
    return "slept"


def check_loop(started: str) -> str:
    mark(started, str(os.getpid()))
    token = current_token()
    while True:
        token.check()
        time.sleep(0.001)


def on_cancel_callback(started: str) -> str:
    token = current_token()
    ran = threading.Event()
    token.on_cancel(ran.set)  # runs in the worker thread that receives the cancel
    mark(started, str(os.getpid()))
    token.wait()
    return "callback ran" if ran.wait(30) else "callback did not run"


def ignore_token(started: str, finally_ran: str) -> None:
    """Ignores its token; the interrupt stops it, and its finally block runs."""
    mark(started, str(os.getpid()))
    try:
        while True:
            time.sleep(0.01)
    finally:
        mark(finally_ran, "finally ran")


def ignore_everything(started: str) -> None:
    """Ignores the token and swallows interrupts; starts a child; only a kill stops it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    mark(started, f"{os.getpid()} {child.pid}")
    while True:
        try:
            while True:
                time.sleep(0.01)
        except BaseException:
            pass


def spin(started: str) -> None:
    """Busy in pure Python, never looking at the token (for the parent-death test)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    mark(started, f"{os.getpid()} {child.pid}")
    while True:
        pass


def token_deadline() -> tuple[float, float]:
    token = current_token()
    return token.deadline - time.monotonic(), token.remaining()


def wait_for_deadline(started: str) -> str:
    mark(started, str(os.getpid()))
    token = current_token()
    token.wait()
    reason = token.reason
    token.check()
    return f"not reached ({reason})"


def exit_with(code: int) -> None:
    os._exit(code)


def call_sys_exit(code: int) -> None:
    sys.exit(code)


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def raise_value_error(message: str) -> None:
    def inner() -> None:
        raise ValueError(message)

    inner()


def return_unpicklable() -> object:
    import threading

    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("carries a lock")
        import threading

        self.lock = threading.Lock()


class BadInitError(Exception):
    """Pickles, but cannot be unpickled: __init__ needs two arguments, .args has one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)


def raise_unpicklable() -> None:
    raise UnpicklableError()


def raise_bad_init() -> None:
    raise BadInitError("a", "b")


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def read_file(path: str) -> str:
    return Path(path).read_text()


def in_worker_imports() -> list[str]:
    return sorted(name for name in sys.modules if name.split(".")[0] in ("anyio", "trio"))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def wait_on_token(started: str, seconds: float) -> bool:
    """True if the token fired within `seconds` (a deadline moved later must not fire it)."""
    mark(started, str(os.getpid()))
    return current_token().wait(seconds)


class SlowToLoad:
    """An argument that takes `seconds` to unpickle: the worker is still loading the job."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[object, tuple[float]]:
        return (_load_slowly, (self.seconds,))


def _load_slowly(seconds: float) -> SlowToLoad:
    time.sleep(seconds)
    return SlowToLoad(seconds)


def mark_if_run(path: str, _slow: object) -> str:
    mark(path, "ran")
    return "ran"


class LoadsWhen:
    """An argument that cannot be loaded until `gate` exists, as a job whose module takes
    its time to import: the worker marks `loading` with its pid, then waits on the file."""

    def __init__(self, loading: str, gate: str) -> None:
        self.loading = loading
        self.gate = gate

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (_load_when, (self.loading, self.gate))


def _load_when(loading: str, gate: str) -> LoadsWhen:
    mark(loading, str(os.getpid()))
    while not os.path.exists(gate):
        time.sleep(0.002)
    return LoadsWhen(loading, gate)


class ExitsWhileLoading:
    """An argument whose loading ends the worker: it notes the worker's pid in `log`
    (one line per worker that tried), then exits with status 3."""

    def __init__(self, log: str) -> None:
        self.log = log

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_exit_while_loading, (self.log,))


def _exit_while_loading(log: str) -> None:
    note_and_exit(log)


def note_and_exit(log: str) -> None:
    """Note this worker's pid in `log`, then exit with status 3 (from the job itself)."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    os._exit(3)


def close_job_pipe() -> int:
    """Break this worker and return normally: close the pipe it reads its jobs from.

    The job pipe is the first descriptor among the worker's arguments.
    """
    os.close(next(int(arg) for arg in sys.argv[1:] if arg.isdigit()))
    return os.getpid()


def fork_while_the_worker_lock_is_held() -> int:
    """Fork while another thread holds the worker's own lock (the control listener's);
    the child's exit status: 0 if it could take that lock, 1 if not (or by a signal)."""
    from bridgecancel._process import _child

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _child._state.lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        os._exit(0 if _child._state.lock.acquire(timeout=5) else 1)
    release.set()
    thread.join()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
