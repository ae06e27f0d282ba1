"""The open-loop client of benchmarks/serve_load.py against a real aiohttp server on 127.0.0.1
that answers after a known delay: every request is counted, latency includes the delay, and
latencies are timed with a sub-millisecond clock (uvloop's loop.time() rounded them to whole ms)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

from tests.conftest import load_script

DELAY_S = 0.004


def _load_serve_load():
    return load_script("benchmarks/serve_load.py")


def _serve(port_box: list, stop: threading.Event) -> None:
    from aiohttp import web

    async def recommend(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(DELAY_S)
        status = 422 if body["user_id"] == "bad" else 200
        return web.json_response({"items": []}, status=status)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/recommend", recommend)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_box.append(site._server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())


def test_open_loop_counts_every_request_and_times_them_finely():
    sl = _load_serve_load()
    port_box: list[int] = []
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(port_box, stop), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while not port_box and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        users = ["u1", "u2", "bad", "u3"]
        import uvloop  # as run_rates runs it: uvloop's loop.time() is a cached millisecond clock

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(sl.open_loop(f"http://127.0.0.1:{port_box[0]}", users, 10, rate=40, duration=1.0, timeout=5))
    finally:
        stop.set()
        server.join(timeout=10)
    assert out["requests"] == 40 and out["ok"] == 30 and out["errors"] == 10  # every 4th user answers 422
    assert out["error_kinds"] == {"HTTP 422": 10}
    assert out["p50_ms"] >= DELAY_S * 1e3  # measured from the scheduled send: the server's delay is in it
    # the slowest request is one real sample (percentiles interpolate): timed on a millisecond clock
    # it would be whole milliseconds, since its schedule (t0 + i / 40) is too
    assert abs(out["max_ms"] - round(out["max_ms"])) > 1e-6, out["max_ms"]
    json.dumps(out)  # what the benchmark writes
