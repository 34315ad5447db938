"""The typing names newer than Python 3.10, in one place, and the `*args` type variable.

Standard library only from 3.11 (``typing_extensions`` on 3.10).
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from typing import Self, TypeVarTuple, Unpack
else:  # pragma: no cover - exercised on 3.10 only
    from typing_extensions import Self, TypeVarTuple, Unpack

__all__ = ("PosArgsT", "Self", "Unpack")

PosArgsT = TypeVarTuple("PosArgsT")
"""The positional arguments of ``fn(*args)`` APIs, as in anyio's ``to_thread.run_sync``."""
