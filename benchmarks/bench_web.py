"""Web benchmarks: a client that leaves, and what the middleware costs, under real servers.

    python benchmarks/bench_web.py [--quick]
    python benchmarks/bench_web.py --plot benchmarks/results/curated-web.json

Measures `CancelOnDisconnectMiddleware` under uvicorn (asyncio) and hypercorn's trio
worker, each serving on 127.0.0.1 from a thread of this process, beside the anchor: the
same app without the middleware.

1. **Cancel latency.** A raw-socket client sends ``GET`` (or ``POST`` with a 200 KB body
   the app never reads), waits until the handler's `run_sync` worker is waiting on its
   token, and closes its socket. The time runs from just before ``close()`` to the moment
   the worker's ``token.wait()`` returns. Anchor: without the middleware the token never
   fires; the worker runs to the end of its bounded job, and how long it ran on after the
   client left is reported. Target: p50 <= 1 ms, p99 <= 10 ms.
2. **Requests per second** of a trivial endpoint with and without the middleware, loaded
   by ``wrk`` in another process, the two taking turns on the same server. Target: at
   most 5% fewer. Beside it, this process's CPU time per request (the server's alone).
   Skipped, with a line saying how to install it, when ``wrk`` is absent.
3. **Per-call cost** of the middleware without a server: the trivial app called directly
   with an in-memory ``receive``/``send`` that behave like uvicorn's, on asyncio and trio.

``--plot FILE`` draws the latency distributions beside the anchors, and the per-call
costs, from a result file into ``docs/img/web-*.png`` (needs matplotlib, in the bench
group).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio

import _harness as h
import bridgecancel
from bridgecancel.asgi import CancelOnDisconnectMiddleware

AREA = "web"
SERVERS = ("uvicorn", "hypercorn-trio")
METHODS = ("GET", "POST 200 KB")
POST_BODY = b"x" * 200_000
IMG_DIR = Path(__file__).resolve().parent.parent / "docs" / "img"
PATIENCE = 10.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- the app ---------------------------------------------------------------------------


class Probe:
    """One request's worker, seen from the client: when it started, when its token fired."""

    def __init__(self, job_seconds: float) -> None:
        self.job_seconds = job_seconds
        self.started = threading.Event()
        self.done = threading.Event()
        self.fired = False
        self.ended_at = 0.0

    def work(self) -> None:
        token = bridgecancel.current_token()
        self.started.set()
        self.fired = token.wait(self.job_seconds)  # the job: waits on its token, bounded
        self.ended_at = time.perf_counter()
        self.done.set()


class State:
    probe = Probe(0.0)  # the current request's; the client makes one request at a time


async def _send_text(send: Send, text: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


async def endpoints(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI. ``/<prefix>/work``: a worker waiting on its token; anything else: ``ok``."""
    if scope["path"].endswith("/work"):
        await bridgecancel.run_sync(State.probe.work)
        await _send_text(send, b"worked")
    else:
        await _send_text(send, b"ok")


def _fastapi_app() -> Any:
    from fastapi import FastAPI

    api = FastAPI(openapi_url=None)

    @api.get("/{prefix}/fastapi/")
    async def trivial(prefix: str) -> dict[str, bool]:
        return {"ok": True}

    return api


# The trivial endpoints, raw and as FastAPI's users write them: (without, with) middleware.
VARIANTS: dict[str, tuple[Any, Any]] = {
    "raw ASGI": (endpoints, CancelOnDisconnectMiddleware(endpoints)),
}
try:
    _api = _fastapi_app()
    VARIANTS["FastAPI"] = (_api, CancelOnDisconnectMiddleware(_api))
except ImportError:  # FastAPI is in the test group, not the bench group
    pass
PATHS = {"raw ASGI": "raw/", "FastAPI": "fastapi/"}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/mw/...`` goes through the middleware, ``/plain/...`` does not: one server, both."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    variant = "FastAPI" if scope["path"].endswith("/fastapi/") else "raw ASGI"
    without, with_ = VARIANTS[variant]
    await (with_ if scope["path"].startswith("/mw/") else without)(scope, receive, send)


# -- servers in a thread -------------------------------------------------------------------


@contextmanager
def serving(server: str) -> Iterator[int]:
    """Serve `app` on 127.0.0.1 from a thread; yields the port."""
    started = threading.Event()
    stop: list[Callable[[], None]] = []
    errors: list[BaseException] = []
    port = 0

    def run_uvicorn() -> None:
        import uvicorn

        # uvicorn binds its own socket: asyncio sets TCP_NODELAY only on sockets made with
        # proto IPPROTO_TCP, which socket.create_server's are not (a 40 ms delayed-ACK
        # stall per response would follow).
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                access_log=False, lifespan="on", backlog=1024)
        instance = uvicorn.Server(config)

        async def main() -> None:
            nonlocal port
            task = asyncio.ensure_future(instance.serve())
            while not instance.started and not task.done():
                await asyncio.sleep(0.01)
            if not instance.started:
                await task  # raises what stopped it, if anything did
                raise RuntimeError("uvicorn exited before it started serving")
            port = instance.servers[0].sockets[0].getsockname()[1]
            stop.append(lambda: setattr(instance, "should_exit", True))
            started.set()
            await task

        asyncio.run(main())

    def run_hypercorn_trio() -> None:
        import trio
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.loglevel = "WARNING"  # no "Running on ..." line in the report
        config.backlog = 1024

        async def main() -> None:
            nonlocal port
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    lambda task_status: serve(
                        app, config, shutdown_trigger=shutdown.wait, task_status=task_status
                    )
                )
                port = int(binds[0].rsplit(":", 1)[1])
                token = trio.lowlevel.current_trio_token()
                stop.append(lambda: trio.from_thread.run_sync(shutdown.set, trio_token=token))
                started.set()

        trio.run(main)

    target = run_uvicorn if server == "uvicorn" else run_hypercorn_trio

    def thread_main() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=thread_main, name=f"bench {server}", daemon=True)
    thread.start()
    started.wait(PATIENCE)
    if errors or not stop:
        raise RuntimeError(f"{server} did not start") from (errors[0] if errors else None)
    try:
        yield port
    finally:
        stop[0]()
        thread.join(PATIENCE)


# -- 1. cancel latency ------------------------------------------------------------------------


def _request(method: str, path: str) -> bytes:
    if method == "GET":
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(POST_BODY)}\r\n\r\n"
    return head.encode() + POST_BODY


def leave_once(port: int, path: str, method: str, job_seconds: float) -> tuple[bool, float]:
    """One request whose client leaves once its worker runs.

    Returns whether the worker's token fired, and the seconds from the client's
    ``close()`` to the worker's end (its token firing, or its job's natural end).
    """
    probe = State.probe = Probe(job_seconds)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(_request(method, path))
        if not probe.started.wait(PATIENCE):
            raise RuntimeError(f"the worker behind {method} {path} never started")
        left = time.perf_counter()
    # Closed: the client has gone.
    if not probe.done.wait(job_seconds + PATIENCE):
        raise RuntimeError(f"the worker behind {method} {path} never ended")
    return probe.fired, probe.ended_at - left


def bench_latency(samples: int, anchor_samples: int, rounds: int, job_seconds: float) -> dict[
    str, Any
]:
    """Per server and method: the middleware's latencies and the anchor's run-on times."""
    out: dict[str, Any] = {}
    for server in SERVERS:
        with serving(server) as port:
            for method in METHODS:
                leave_once(port, "/mw/work", method, PATIENCE)  # warm up both paths
                key = f"{server}, {method}"
                latencies: list[float] = []
                per_round: list[list[float]] = []
                anchor: list[float] = []
                fired_without = 0
                not_fired_with = 0
                for r in range(rounds):
                    per_round.append([])
                    for contender in h.round_order(["mw", "anchor"], r):
                        if contender == "mw":
                            for _ in range(samples // rounds):
                                fired, seconds = leave_once(port, "/mw/work", method, PATIENCE)
                                not_fired_with += not fired
                                latencies.append(seconds)
                                per_round[-1].append(seconds)
                        else:
                            for _ in range(max(1, anchor_samples // rounds)):
                                fired, seconds = leave_once(
                                    port, "/plain/work", method, job_seconds
                                )
                                fired_without += fired
                                anchor.append(seconds)
                out[key] = {
                    **h.latency_summary(latencies, per_round),
                    "samples_ms": [round(s * 1e3, 4) for s in latencies],
                    "not_fired": not_fired_with,
                    "anchor_ms": [round(s * 1e3, 2) for s in anchor],
                    "anchor_fired": fired_without,
                    "anchor_job_ms": job_seconds * 1e3,
                }
    return out


# -- 2. requests per second (wrk) ------------------------------------------------------------


WRK_MISSING = "wrk not found: install it (Debian: apt-get install wrk) to measure requests/s"


def _wrk(port: int, path: str, seconds: int, connections: int) -> tuple[float, float]:
    """Load `path` with wrk; returns requests/s and the server's CPU seconds per request.

    The CPU time is this process's (the server's thread; the main thread only waits for
    wrk): a busy machine slows both contenders' requests per second by whatever share of
    the CPUs it takes, but changes the CPU a request costs much less.
    """
    cpu = time.process_time()
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )
    cpu = time.process_time() - cpu
    match = re.search(r"Requests/sec:\s*([\d.]+)", result.stdout)
    served = re.search(r"(\d+) requests in", result.stdout)
    if (match is None or served is None or "Non-2xx" in result.stdout
            or "Socket errors" in result.stdout):
        raise RuntimeError(f"wrk failed against {path}:\n{result.stdout}{result.stderr}")
    return float(match.group(1)), cpu / max(1, int(served.group(1)))


def bench_rps(rounds: int, seconds: int, connections: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server in SERVERS:
        with serving(server) as port:
            for variant in VARIANTS:
                path = PATHS[variant]
                _wrk(port, f"/mw/{path}", 1, connections)  # warm up
                rps: dict[str, list[float]] = {"mw": [], "plain": []}
                cpu: dict[str, list[float]] = {"mw": [], "plain": []}
                for r in range(rounds):
                    for contender in h.round_order(["mw", "plain"], r):
                        got, cpu_per_request = _wrk(
                            port, f"/{contender}/{path}", seconds, connections
                        )
                        rps[contender].append(got)
                        cpu[contender].append(cpu_per_request)
                per_round = [m / p for m, p in zip(rps["mw"], rps["plain"], strict=True)]
                out[f"{server}, {variant}"] = {
                    "ratio_min": min(per_round),
                    "ratio_max": max(per_round),
                    "rps_mw": h.median(rps["mw"]),
                    "rps_plain": h.median(rps["plain"]),
                    "ratio": h.paired_ratio(rps["mw"], rps["plain"]),
                    "rounds_mw": rps["mw"],
                    "rounds_plain": rps["plain"],
                    "cpu_us_mw": h.median(cpu["mw"]) * 1e6,
                    "cpu_us_plain": h.median(cpu["plain"]) * 1e6,
                    "cpu_ratio": h.paired_ratio(cpu["mw"], cpu["plain"]),
                }
    return out


# -- 3. per call, no server ------------------------------------------------------------------


def _uvicorn_like_receive(complete: list[bool], woken: list[Any]) -> Receive:
    """The request, then (like uvicorn) ``http.disconnect`` once the response is complete."""
    sent_request = False

    async def receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not complete[0]:
            event = anyio.Event()
            woken.append(event)
            await event.wait()
        return {"type": "http.disconnect"}

    return receive


async def _call(target: Callable[[Scope, Receive, Send], Awaitable[None]], path: str) -> None:
    complete = [False]
    woken: list[Any] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete[0] = True
            for event in woken:
                event.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await target(scope, _uvicorn_like_receive(complete, woken), send)


async def _time_calls(target: Callable[..., Awaitable[None]], path: str, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await _call(target, path)
    return (time.perf_counter() - started) / calls


def bench_per_call(rounds: int, calls: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend, variant in itertools.product(("asyncio", "trio"), VARIANTS):
        times: dict[str, list[float]] = {"mw": [], "plain": []}
        without, with_ = VARIANTS[variant]
        targets = {"mw": with_, "plain": without}
        path = f"/x/{PATHS[variant]}"

        async def measure(
            times: dict[str, list[float]] = times, targets: dict[str, Any] = targets,
            path: str = path,
        ) -> None:
            await _time_calls(targets["mw"], path, calls // 10)  # warm up
            for r in range(rounds):
                for contender in h.round_order(["mw", "plain"], r):
                    times[contender].append(await _time_calls(targets[contender], path, calls))

        anyio.run(measure, backend=backend)
        out[f"{variant}, {backend}"] = {
            "mw_us": h.median(times["mw"]) * 1e6,
            "plain_us": h.median(times["plain"]) * 1e6,
            "overhead_us": h.median(
                m - p for m, p in zip(times["mw"], times["plain"], strict=True)
            ) * 1e6,
        }
    return out


# -- the area ------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    if quick:
        latency = bench_latency(samples=40, anchor_samples=2, rounds=2, job_seconds=0.2)
        per_call = bench_per_call(rounds=4, calls=2_000)
        rps_args = {"rounds": 3, "seconds": 2, "connections": 16}
    else:
        latency = bench_latency(samples=300, anchor_samples=6, rounds=6, job_seconds=0.5)
        per_call = bench_per_call(rounds=8, calls=10_000)
        rps_args = {"rounds": 12, "seconds": 2, "connections": 16}
    rps = bench_rps(**rps_args) if shutil.which("wrk") else None
    if rps is None:
        print(WRK_MISSING)
    return {**_summarise(latency, rps, per_call, rps_args), "quick": quick}


def _summarise(
    latency: dict[str, Any], rps: dict[str, Any] | None, per_call: dict[str, Any],
    rps_args: dict[str, Any],
) -> dict[str, Any]:
    rows = []
    targets = []
    for key, r in latency.items():
        anchor = r["anchor_ms"]
        rows.append([
            key, f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms", f"{r['max_ms']:.1f} ms",
            f"{r['n'] - r['not_fired']} of {r['n']}",
            f"ran on {h.median(anchor):.0f} ms (job {r['anchor_job_ms']:.0f} ms); "
            f"token fired {r['anchor_fired']} of {len(anchor)}",
        ])
        met = r["p50_ms"] <= 1 and r["p99_ms"] <= 10 and r["not_fired"] == 0
        targets.append({"name": f"cancel latency p50 / p99 ({key})",
                        "target": "<= 1 / 10 ms, every token fired",
                        "measured": f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms", "met": met})
    tables = [{
        "title": "1. client leaves -> worker's token fired (with the middleware)",
        "columns": ["server, request", "p50 / p99", "max", "fired", "anchor: no middleware"],
        "rows": rows,
        "notes": ["the anchor's worker waits on its token for a bounded job: the token "
                  "never fires, so the worker runs to the job's end"],
    }]
    ratios: dict[str, float] = {}
    if rps is None:
        tables.append({"title": "2. requests per second: NOT RUN", "columns": ["why"],
                       "rows": [[WRK_MISSING]], "notes": []})
        for server in (f"{server}, {variant}" for server in SERVERS for variant in VARIANTS):
            targets.append({"name": f"requests/s overhead ({server})", "target": "<= 5%",
                            "measured": None, "met": None, "why": "wrk is not installed"})
    else:
        tables.append({
            "title": "2. requests per second, trivial endpoint (wrk -t1 "
                     f"-c{rps_args['connections']}, {rps_args['rounds']} rounds of "
                     f"{rps_args['seconds']:g} s each)",
            "columns": ["server, endpoint", "with middleware", "without", "ratio",
                        "rounds' ratios", "server CPU per request, with / without"],
            "rows": [[s, f"{r['rps_mw']:,.0f}", f"{r['rps_plain']:,.0f}", f"{r['ratio']:.3f}x",
                      f"{r['ratio_min']:.2f} to {r['ratio_max']:.2f}",
                      f"{r['cpu_us_mw']:.0f} / {r['cpu_us_plain']:.0f} us "
                      f"({r['cpu_ratio']:.3f}x)"]
                     for s, r in rps.items()],
            "notes": ["ratio: median of per-round ratios, with / without; then their spread "
                      "(the machine's other load moves both contenders), and the server "
                      "process's CPU time per request (median of rounds; ratio: median of "
                      "per-round ratios)"],
        })
        for server, r in rps.items():
            ratios[f"requests/s, {server}: middleware / none"] = r["ratio"]
            targets.append({"name": f"requests/s overhead ({server})", "target": "<= 5%",
                            "measured": f"{(1 - r['ratio']) * 100:.1f}%",
                            "met": r["ratio"] >= 0.95})
    tables.append({
        "title": "3. per call, no server (in-memory receive/send like uvicorn's)",
        "columns": ["endpoint, backend", "with middleware", "without", "overhead"],
        "rows": [[b, f"{r['mw_us']:.1f} us", f"{r['plain_us']:.1f} us",
                  f"{r['overhead_us']:.1f} us"] for b, r in per_call.items()],
        "notes": [],
    })
    for backend, r in per_call.items():
        ratios[f"per call, {backend}: middleware / none"] = r["mw_us"] / r["plain_us"]
    return {"latency": latency, "rps": rps, "rps_settings": rps_args, "per_call": per_call,
            "tables": tables, "ratios": ratios, "targets": targets}


def report(results: dict[str, Any]) -> None:
    h.print_results(results)


# -- plots --------------------------------------------------------------------------------


def plot(results: dict[str, Any], out_dir: Path = IMG_DIR) -> list[Path]:
    """Draw ``web-cancel-latency.png`` and ``web-overhead.png`` into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    machine = results.get("machine", {})
    where = (f"{machine.get('cpu_count')} CPUs, load {machine.get('loadavg_1_5_15')}, "
             f"Python {machine.get('python')}, {'quick' if results.get('quick') else 'full'} run")

    latency = results["latency"]
    keys = list(latency)
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(keys) + 1.6), dpi=90)
    for i, key in enumerate(keys):
        r = latency[key]
        samples = r["samples_ms"]
        jitter = [i + 0.12 + 0.16 * ((k * 0.618) % 1) for k in range(len(samples))]
        ax.scatter(samples, jitter, s=6, color="tab:blue", alpha=0.5,
                   label="with the middleware" if i == 0 else None)
        for q, mark in ((r["p50_ms"], "|"), (r["p99_ms"], "|")):
            ax.plot([q], [i + 0.2], marker=mark, markersize=16, color="navy")
        anchor = r["anchor_ms"]
        ax.scatter(anchor, [i - 0.2] * len(anchor), s=30, marker="x", color="tab:red",
                   label="without (token never fires; worker runs its job)" if i == 0 else None)
        ax.annotate(f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms",
                    (max(samples), i + 0.2), xytext=(6, -3), textcoords="offset points",
                    fontsize=7)
        if anchor:
            ax.annotate(f"ran on {h.median(anchor):.0f} ms", (min(anchor), i - 0.2),
                        xytext=(-6, -3), textcoords="offset points", fontsize=7,
                        ha="right", color="tab:red")
    for target, text in ((1, "target p50"), (10, "target p99")):
        ax.axvline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.text(target, len(keys) - 0.45, text, fontsize=7, color="grey", ha="center")
    ax.set_xscale("log")
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.set_ylim(-0.6, len(keys) - 0.3)
    ax.set_xlabel("client closed its socket -> the worker stopped waiting (ms, log scale)")
    ax.set_title(f"Cancel latency under real servers\n{where}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    path = out_dir / "web-cancel-latency.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    per_call = results["per_call"]
    rps = results.get("rps")
    panels = (3 if all("cpu_us_mw" in r for r in rps.values()) else 2) if rps else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 3.6), dpi=90, squeeze=False)
    groups = [(k.replace(", ", "\n"), r["plain_us"], r["mw_us"], f"+{r['overhead_us']:.0f} us")
              for k, r in per_call.items()]
    _bars(axes[0][0], groups, "microseconds per call", "App called directly, no server")
    if rps:
        # The label is the median of per-round ratios (the bars are medians of rounds).
        groups = [(k.replace(", ", "\n"), 1e6 / r["rps_plain"], 1e6 / r["rps_mw"],
                   f"{(r['ratio'] - 1) * 100:+.0f}% req/s") for k, r in rps.items()]
        _bars(axes[0][1], groups, "microseconds per request (1 / requests/s)",
              "Under load (wrk)")
        if all("cpu_us_mw" in r for r in rps.values()):
            groups = [(k.replace(", ", "\n"), r["cpu_us_plain"], r["cpu_us_mw"],
                       f"{(r['cpu_ratio'] - 1) * 100:+.0f}% CPU") for k, r in rps.items()]
            _bars(axes[0][2], groups, "server CPU microseconds per request",
                  "Under load (wrk): CPU")
    fig.suptitle(f"What the middleware costs a trivial endpoint\n{where}", fontsize=9)
    fig.tight_layout()
    path = out_dir / "web-overhead.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def _bars(ax: Any, groups: list[tuple[str, float, float, str]], ylabel: str, title: str) -> None:
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], [g[1] for g in groups], 0.4, label="without",
           color="tab:grey")
    ax.bar([x + 0.2 for x in xs], [g[2] for g in groups], 0.4, label="with the middleware",
           color="tab:blue")
    for x, (_, _, with_, label) in zip(xs, groups, strict=True):
        ax.annotate(label, (x + 0.2, with_),
                    xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(list(xs), [g[0] for g in groups], fontsize=7)
    ax.margins(y=0.12)  # room for the labels above the bars
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plot", metavar="FILE", default=None)
    args, rest = parser.parse_known_args(argv)
    if args.plot:
        import json

        for path in plot(json.loads(Path(args.plot).read_text(encoding="utf-8"))):
            print(f"wrote {path}")
        return 0
    return h.standalone_main(AREA, __doc__, run, rest)


if __name__ == "__main__":
    sys.exit(main())
