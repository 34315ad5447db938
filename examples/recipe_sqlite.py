"""Recipe: stop a long SQLite query when the calling scope is cancelled.

    python examples/recipe_sqlite.py

SQLite runs a query in C, where no token check can reach it. ``Connection.interrupt()``
can, from any thread: register it with ``token.on_cancel`` around the query, and the
query fails with ``sqlite3.OperationalError: interrupted`` the moment the caller is
cancelled; turn that into ``Cancelled`` with ``token.check()``.

``interrupt()`` only stops statements already running, so a cancel that lands between
the registration and the start of the query would be missed. A progress handler that
reads the token closes that gap (it costs one attribute read per 10,000 SQLite
instructions).

The bridge runs ``on_cancel`` callbacks in a thread of their own, never in the event
loop, so one may run a moment after the query has already stopped (through the progress
handler) and the connection has closed: the callback ignores a closed connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time

import anyio

from bridgecancel import current_token, run_sync

# Counts to a billion: minutes of work for SQLite.
SLOW_QUERY = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000)
    SELECT count(*) FROM n
"""


def query_one(database: str, sql: str) -> object:
    """Run `sql` and return the first column of its first row; stop on cancel."""
    token = current_token()
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.set_progress_handler(lambda: token.cancel_called, 10_000)
        with token.on_cancel(_interrupt, conn):
            try:
                return conn.execute(sql).fetchone()[0]
            except sqlite3.OperationalError:
                token.check()  # interrupted because of the token: raise Cancelled
                raise


def _interrupt(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.ProgrammingError):  # closed already: nothing to stop
        conn.interrupt()


async def main() -> None:
    print("a quick query:", await run_sync(query_one, ":memory:", "SELECT 6 * 7"))
    started = time.perf_counter()
    with anyio.move_on_after(0.5) as scope:
        await run_sync(query_one, ":memory:", SLOW_QUERY)
    stopped = time.perf_counter() - started
    print(f"slow query cancelled: {scope.cancelled_caught}, scope left after {stopped:.2f} s")


if __name__ == "__main__":
    anyio.run(main)
