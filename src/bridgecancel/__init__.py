"""Cancel blocking work in threads and processes from async cancel scopes."""

from ._bridge import cancel_on as cancel_on
from ._bridge import open_token as open_token
from ._exceptions import BrokenWorkerError as BrokenWorkerError
from ._exceptions import Cancelled as Cancelled
from ._processes import RemoteTraceback as RemoteTraceback
from ._processes import current_default_process_limiter as current_default_process_limiter
from ._processes import run_process as run_process
from ._stats import Statistics as Statistics
from ._stats import WorkerStatistics as WorkerStatistics
from ._stats import statistics as statistics
from ._threads import run_sync as run_sync
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
    "RemoteTraceback",
    "Statistics",
    "WorkerStatistics",
    "any_of",
    "cancel_on",
    "check_cancelled",
    "current_default_process_limiter",
    "current_token",
    "open_token",
    "run_process",
    "run_sync",
    "statistics",
)
