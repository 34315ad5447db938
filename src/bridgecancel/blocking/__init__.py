"""Token-aware blocking calls: each waits on a stdlib primitive and on a token together.

Every function here waits like the call it wraps (same return value, same timeout
semantics, same exceptions) and, in addition, raises `Cancelled` as soon as the token
fires: the token given as ``token=``, else `current_token()` (which, outside a
bridgecancel worker, never fires: the functions then simply call the wrapped method).

Cancellation semantics, common to all of them:

* A token that has already fired raises `Cancelled` before any waiting, even if the
  primitive is ready (an event set, an item queued): each call is a checkpoint.
* A cancel never alters the primitive: the queue keeps its items, a lock or semaphore
  keeps its state, the event is not set, the socket stays open and in its mode. A
  notification that the cancelled waiter had already received is passed on to another
  waiter. The exceptions are the operations that have started to act on the world:
  `sendall` may have sent part of the data, `connect` leaves the connection attempt
  running (close the socket), and the process functions stop the child.
* Timeouts are seconds or None (no limit); a negative or NaN timeout is refused with
  `ValueError` (the stdlib calls disagree on what it would mean).
* Wake-up is event-driven (no polling) for events, conditions, semaphores, queues,
  futures, sockets, descriptors, and child processes on Linux (pidfd). `Lock` and
  `RLock` cannot be woken from outside without being released, so `acquire` waits on
  them in slices of at most `POLL_SLICE` seconds (10 ms), as do child processes where
  the OS has no pidfd, and descriptors where ``select.poll`` is missing (Windows).

Waking a thread that waits on a condition variable uses the internals of CPython's
``threading`` module (a condition's waiter list, the conditions inside events,
semaphores, queues and futures), checked together once at import; where any is not as
expected, these waits fall back to `POLL_SLICE` slices of the public methods, with the
same semantics.
"""

from __future__ import annotations

from ._common import DEFAULT_GRACE as DEFAULT_GRACE
from ._common import POLL_SLICE as POLL_SLICE
from ._fd import accept as accept
from ._fd import connect as connect
from ._fd import recv as recv
from ._fd import sendall as sendall
from ._fd import wait_readable as wait_readable
from ._fd import wait_writable as wait_writable
from ._subprocess import run_subprocess as run_subprocess
from ._subprocess import wait_process as wait_process
from ._sync import acquire as acquire
from ._sync import future_result as future_result
from ._sync import queue_get as queue_get
from ._sync import queue_put as queue_put
from ._sync import wait_condition as wait_condition
from ._sync import wait_event as wait_event

__all__ = (
    "DEFAULT_GRACE",
    "POLL_SLICE",
    "accept",
    "acquire",
    "connect",
    "future_result",
    "queue_get",
    "queue_put",
    "recv",
    "run_subprocess",
    "sendall",
    "wait_condition",
    "wait_event",
    "wait_process",
    "wait_readable",
    "wait_writable",
)

# Name the public module as their home (reprs, pickles, the docs), as anyio does.
for _name in __all__:
    _value = globals()[_name]
    if callable(_value):
        _value.__module__ = __name__
del _name, _value
