"""Hypercorn's trio worker: the same middleware, with trio under the app.

    pip install "hypercorn[trio]" starlette
    python examples/web_hypercorn_trio.py [PORT]    # 8000 by default
    curl '127.0.0.1:8000/wait?seconds=30'    # then press Ctrl-C in curl's terminal

(or ``hypercorn --worker-class trio examples.web_hypercorn_trio:app``). Everything in
bridgecancel runs on trio as on asyncio: the middleware cancels the request's trio cancel
scope when the client leaves, and the worker's token fires.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bridgecancel import Cancelled, current_token, run_sync
from bridgecancel.asgi import CancelOnDisconnectMiddleware


def wait(seconds: float) -> str:
    print(f"wait: waiting {seconds} s", flush=True)
    try:
        current_token().sleep(seconds)  # raises Cancelled the moment the request is cancelled
    except Cancelled:
        print(f"wait: client left before {seconds} s; stopped", flush=True)
        raise
    return f"waited {seconds} s\n"


async def wait_endpoint(request: Request) -> PlainTextResponse:
    seconds = float(request.query_params.get("seconds", "5"))
    return PlainTextResponse(await run_sync(wait, seconds))


app = Starlette(
    routes=[Route("/wait", wait_endpoint)],
    middleware=[Middleware(CancelOnDisconnectMiddleware, timeout=60)],
)

if __name__ == "__main__":
    import sys

    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1] if sys.argv[1:] else 8000}"]
    trio.run(serve, app, config)
