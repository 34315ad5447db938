"""Cancel blocking work in threads and processes from async cancel scopes."""

from ._exceptions import BrokenWorkerError as BrokenWorkerError
from ._exceptions import Cancelled as Cancelled
from ._token import CancelSource as CancelSource
from ._token import CancelToken as CancelToken
from ._token import Registration as Registration
from ._token import any_of as any_of
from ._token import check_cancelled as check_cancelled
from ._token import current_token as current_token

__all__ = (
    "BrokenWorkerError",
    "CancelSource",
    "CancelToken",
    "Cancelled",
    "Registration",
    "any_of",
    "check_cancelled",
    "current_token",
)
