"""How messages name a function, on both sides of a process job.

Private (`bridgecancel._util.describe`, and the worker's `bridgecancel._process._child`):
a helper with no public surface, except the error messages that use it.
"""

from __future__ import annotations

import functools

from bridgecancel._process import _child as _worker_results
from bridgecancel._util import describe


def _job() -> None:
    pass


def test_a_function_is_named_by_module_and_qualname() -> None:
    assert describe(_job) == f"{__name__}._job()"


def test_anything_without_a_qualname_is_its_repr() -> None:
    partial = functools.partial(_job)
    assert describe(partial) == repr(partial)


def test_the_worker_names_functions_with_the_same_helper() -> None:
    assert vars(_worker_results)["describe"] is describe  # imported, not re-exported
