"""Django: an async view whose worker thread stops when its client leaves.

    pip install django uvicorn
    python examples/web_django.py [PORT]    # 8000 by default
    curl '127.0.0.1:8000/export?rows=100'    # then press Ctrl-C in curl's terminal

Django (5.0 and later) cancels an async view itself when the client disconnects, so no
middleware is needed: `bridgecancel.run_sync` passes that cancellation to its worker's
token. (A sync view, or ``sync_to_async``, would keep its thread running to the end.)

One file for the example; in a project, the view goes in views.py and the settings in
settings.py as usual.
"""

from __future__ import annotations

import django
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

from bridgecancel import Cancelled, current_token, run_sync


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


urlpatterns = [path("export", export_view)]

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="example only: set a real secret in a real project",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
    )
django.setup(set_prefix=False)

from django.core.asgi import get_asgi_application  # noqa: E402  (after settings)

app = get_asgi_application()

if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if sys.argv[1:] else 8000)
