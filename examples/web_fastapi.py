"""FastAPI: a plain ``def`` endpoint that stops when its client leaves.

    pip install fastapi uvicorn
    python examples/web_fastapi.py [PORT]    # 8000 by default
    curl '127.0.0.1:8000/report?rows=100'    # then press Ctrl-C in curl's terminal

FastAPI runs a plain ``def`` endpoint in a worker thread that nobody can stop: a client
that leaves does not end it. With `threaded`, the endpoint runs through
`bridgecancel.run_sync` instead, and `CancelOnDisconnectMiddleware` cancels the request
when its client disconnects (or after `timeout` seconds), so the endpoint's token fires
and the loop below stops at its next ``token.sleep``. Path, query and ``Depends``
parameters work as before: `threaded` keeps the function's signature.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI

from bridgecancel import Cancelled, current_token
from bridgecancel.asgi import CancelOnDisconnectMiddleware, threaded

app = FastAPI()
app.add_middleware(CancelOnDisconnectMiddleware, timeout=60)


@threaded
def page_size(size: int = 10) -> int:
    """A sync dependency can be made cancellable the same way."""
    return max(1, min(size, 1000))


@app.get("/report")
@threaded
def report(size: Annotated[int, Depends(page_size)], rows: int = 50) -> dict[str, int]:
    token = current_token()
    done = 0
    print(f"report: working on {rows} rows", flush=True)
    try:
        for _ in range(rows):
            token.sleep(0.1)  # stands for a slow query or API call per row
            done += 1
    except Cancelled:
        print(f"report: client left after {done} of {rows} rows; stopped", flush=True)
        raise
    return {"rows": done, "size": size}


if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if sys.argv[1:] else 8000)
