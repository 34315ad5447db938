"""Starlette: an async endpoint whose blocking work stops when its client leaves.

    pip install starlette uvicorn
    python examples/web_starlette.py [PORT]    # 8000 by default
    curl '127.0.0.1:8000/primes?below=50000000'    # then press Ctrl-C in curl's terminal

The endpoint runs CPU-bound work through `bridgecancel.run_sync`. Under
`CancelOnDisconnectMiddleware`, a client that disconnects cancels the request, the worker's
token fires, and the loop stops at its next ``token.check()``: the thread is gone a moment
after the client, instead of counting on for minutes.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridgecancel import current_token, run_sync
from bridgecancel.asgi import CancelOnDisconnectMiddleware


def count_primes(below: int) -> int:
    token = current_token()
    print(f"primes: counting below {below}", flush=True)
    count = 0
    for n in range(2, below):
        if n % 1024 == 0 and token.cancel_called:
            print(f"primes: client left at {n} of {below}; stopped", flush=True)
            token.check()  # raises Cancelled: the request is cancelled
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return count


async def primes(request: Request) -> JSONResponse:
    below = int(request.query_params.get("below", "100000"))
    return JSONResponse({"below": below, "primes": await run_sync(count_primes, below)})


app = Starlette(
    routes=[Route("/primes", primes)],
    middleware=[Middleware(CancelOnDisconnectMiddleware)],
)

if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if sys.argv[1:] else 8000)
