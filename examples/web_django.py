"""Django: views whose work stops when the client leaves, sync and async.

    pip install django uvicorn               # and psycopg for PostgreSQL
    python examples/web_django.py [PORT]     # 8000 by default
    curl '127.0.0.1:8000/report?seconds=30'  # then press Ctrl-C in curl's terminal
    curl '127.0.0.1:8000/export?rows=100'    # the same

``/report`` is a plain ``def`` view that runs a slow query through Django's cursor,
made cancellable with `bridgecancel.django.cancellable`: when the client leaves, the
query is cancelled on the database server and the view stops with `Cancelled` (without
the decorator, Django would leave it running to its end in its thread). The database is
an in-memory SQLite one, or PostgreSQL if ``BRIDGECANCEL_TEST_PG_DSN`` names a server
(``bash .ci/postgres.sh`` starts one and prints its DSN).

``/export`` is an async view: Django (5.0 and later) cancels it itself when the client
disconnects, so no decorator is needed, and `bridgecancel.run_sync` passes that
cancellation to its worker's token.

One file for the example; in a project, the views go in views.py and the settings in
settings.py as usual.
"""

from __future__ import annotations

import os

import django
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

from bridgecancel import Cancelled, current_token, run_sync
from bridgecancel.django import cancellable

# SQLite counts a few million numbers a second: for `seconds`, count that many.
COUNT = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s)
    SELECT count(*) FROM n
"""


@cancellable(timeout=120)  # the client leaves, or two minutes pass: the view stops
def report(request: HttpRequest) -> JsonResponse:
    seconds = float(request.GET.get("seconds", "30"))
    print(f"report: query running ({connection.vendor}, {seconds} s)", flush=True)
    try:
        with connection.cursor() as cursor:  # stands for a slow report query
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_sleep(%s)", [seconds])
            else:
                cursor.execute(COUNT, [int(seconds * 2_000_000)])
    except Cancelled:
        reason = current_token().reason
        print(f"report: client left ({reason}); query cancelled on the database", flush=True)
        raise
    return JsonResponse({"seconds": seconds})


def export(rows: int) -> int:
    token = current_token()
    done = 0
    print(f"export: working on {rows} rows", flush=True)
    try:
        for _ in range(rows):
            token.sleep(0.1)  # stands for writing one slow row
            done += 1
    except Cancelled:
        print(f"export: client left after {done} of {rows} rows; stopped", flush=True)
        raise
    return done


async def export_view(request: HttpRequest) -> JsonResponse:
    rows = int(request.GET.get("rows", "50"))
    return JsonResponse({"rows": await run_sync(export, rows)})


urlpatterns = [path("report", report), path("export", export_view)]


def database() -> dict[str, object]:
    dsn = os.environ.get("BRIDGECANCEL_TEST_PG_DSN")
    if not dsn:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "USER": params.get("user", ""),
        "NAME": params.get("dbname", ""),
    }


if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="example only: set a real secret in a real project",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        DATABASES={"default": database()},
    )
django.setup(set_prefix=False)

from django.core.asgi import get_asgi_application  # noqa: E402  (after settings)

app = get_asgi_application()

if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if sys.argv[1:] else 8000)
