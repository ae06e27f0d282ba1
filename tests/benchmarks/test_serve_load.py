"""benchmarks/serve_load.py: the open-loop client (benchmarks/servers.py) against a real aiohttp server on 127.0.0.1 that
answers after a known delay (every request counted, latency includes the delay, timed with a
sub-millisecond clock: uvloop's loop.time() rounded them to whole ms), the pure functions that turn
rows into ratios, goals and the overload verdict (hand-computed expected values), and the no-op
Ray Serve app through the HAProxy ingress (marked `ray`, a few seconds of requests)."""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import pytest

from tests.conftest import load_script

DELAY_S = 0.004


@pytest.fixture(scope="module")
def sl():
    return load_script("benchmarks/serve_load.py")


@pytest.fixture(scope="module")
def srv(sl):
    import servers  # benchmarks/ is on sys.path once serve_load.py is loaded

    return servers


def _serve(port_box: list, stop: threading.Event) -> None:
    from aiohttp import web

    async def recommend(request: web.Request) -> web.Response:
        body = await request.json()
        if body["user_id"] == "busy":  # shed at once, as Serve's admission control does
            return web.Response(status=503, text="Request dropped due to backpressure")
        await asyncio.sleep(DELAY_S)
        status = 422 if body["user_id"] == "bad" or body.get("diversity", 0.5) != 0.5 else 200
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


@pytest.fixture(scope="module")
def server_url():
    port_box: list[int] = []
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(port_box, stop), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while not port_box and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port_box[0]}"
    stop.set()
    server.join(timeout=10)


def _run(coro):
    import uvloop  # as run_rates runs it: uvloop's loop.time() is a cached millisecond clock

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def test_open_loop_counts_every_request_and_times_them_finely(srv, server_url):
    out = _run(srv.open_loop(server_url, ["u1", "u2", "bad", "u3"], 10, rate=40, duration=1.0, timeout=5))
    assert out["requests"] == 40 and out["ok"] == 30 and out["errors"] == 10  # every 4th user answers 422
    assert out["error_kinds"] == {"HTTP 422": 10} and out["error_classes"] == {"503": 0, "timeout": 0, "other": 10}
    assert out["p50_ms"] >= DELAY_S * 1e3  # measured from the scheduled send: the server's delay is in it
    assert out["non_200_latency_ms"]["422"]["n"] == 10 and out["non_200_latency_ms"]["422"]["p50_ms"] >= DELAY_S * 1e3
    # the slowest request is one real sample (percentiles interpolate): timed on a millisecond clock
    # it would be whole milliseconds, since its schedule (t0 + i / 40) is too
    assert abs(out["max_ms"] - round(out["max_ms"])) > 1e-6, out["max_ms"]
    assert out["diversity"] is None
    json.dumps(out)  # what the benchmark writes


def test_open_loop_sends_the_diversity_and_times_503s_apart(srv, server_url):
    # the server answers 422 to any diversity but 0.5, so 0 x 422 proves the field went out as 0.5
    out = _run(srv.open_loop(server_url, ["u1", "busy"], 10, rate=40, duration=1.0, timeout=5, diversity=0.5))
    assert out["requests"] == 40 and out["ok"] == 20 and out["error_kinds"] == {"HTTP 503": 20}
    assert out["error_classes"] == {"503": 20, "timeout": 0, "other": 0} and out["diversity"] == 0.5
    shed = out["non_200_latency_ms"]["503"]
    assert shed["n"] == 20 and shed["p50_ms"] < out["p50_ms"]  # the 503s skip the server's 4 ms delay
    assert set(out["non_200_latency_ms"]) == {"503"} and out["non_200_body_sample"] == {"503": "Request dropped due to backpressure"}


def test_request_body_and_diversity_values(sl, srv):
    assert srv.request_body("u1", 10, None) == {"user_id": "u1", "k": 10}  # no field: the config's default
    assert srv.request_body("u1", 5, 0.5) == {"user_id": "u1", "k": 5, "diversity": 0.5}
    assert sl.parse_diversity("none") is None and sl.parse_diversity("None") is None
    assert sl.parse_diversity("0.5") == 0.5 and sl.parse_diversity("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError):
        sl.parse_diversity("1.5")


def test_error_classes(srv):
    kinds = {"HTTP 503": 7, "HTTP 500": 2, "ServerTimeoutError": 3, "TimeoutError": 1, "unfinished": 4, "ClientOSError": 5}
    assert srv.error_classes(kinds) == {"503": 7, "timeout": 3 + 1 + 4, "other": 2 + 5}
    assert srv.error_classes({}) == {"503": 0, "timeout": 0, "other": 0}


def _row(rps, p50, p99, errors=0, diversity=None, p95=None):
    return {"target_rps": rps, "p50_ms": p50, "p95_ms": p95 or p99, "p99_ms": p99, "max_ms": p99, "errors": errors, "diversity": diversity,
            "achieved_rps": rps, "requests": int(rps * 60), "ok": int(rps * 60) - errors,
            "error_classes": {"503": errors, "timeout": 0, "other": 0}, "non_200_latency_ms": {}}


def _results():
    return {
        "in_process": [{"diversity": None, "p50_ms": 0.5, "p95_ms": 0.7, "p99_ms": 0.9, "max_ms": 1.0, "achieved_rps": 1800},
                       {"diversity": 0.5, "p50_ms": 1.5, "p95_ms": 1.8, "p99_ms": 2.0, "max_ms": 2.5, "achieved_rps": 650}],
        "noop": [_row(100, 2.0, 8.0), _row(300, 3.0, 10.0), _row(600, 50.0, 400.0, errors=12)],
        "ray": [_row(100, 3.0, 10.0), _row(300, 4.0, 16.0), _row(600, 900.0, 3000.0, errors=5000),
                _row(100, 4.5, 14.0, diversity=0.5), _row(300, 6.0, 25.0, diversity=0.5)],
    }


def test_comparisons_are_ratios_to_noop_and_differences_to_in_process(sl):
    c = {(x["diversity"], x["rps"]): x for x in sl.comparisons(_results())}
    assert c[(None, 100)]["p99_over_noop"] == 1.25 and c[(None, 100)]["p50_minus_in_process_ms"] == 2.5  # 10 / 8; 3.0 - 0.5
    assert c[(None, 300)]["p99_over_noop"] == 1.6 and c[(None, 300)]["p50_minus_in_process_ms"] == 3.5  # 16 / 10; 4.0 - 0.5
    assert c[(None, 600)]["p99_over_noop"] == 7.5 and c[(None, 600)]["noop_errors"] == 12  # 3000 / 400
    assert c[(0.5, 100)]["p99_over_noop"] == 1.75 and c[(0.5, 100)]["p50_minus_in_process_ms"] == 3.0  # 14 / 8; 4.5 - 1.5 (same diversity)
    assert c[(0.5, 300)]["p99_over_noop"] == 2.5 and c[(0.5, 300)]["p50_minus_in_process_ms"] == 4.5  # 25 / 10; 6.0 - 1.5
    assert sl.comparisons({"ray": [_row(100, 3.0, 10.0)]})[0]["p99_over_noop"] is None  # no noop target: no ratio


def test_capacity_and_the_overload_rate(sl):
    rows = [_row(100, 3, 10), _row(200, 3, 12), _row(300, 4, 25), _row(400, 5, 15, errors=1)]
    assert sl.capacity(rows) == 200  # 300: p99 25 > 20; 400: an error
    assert sl.overload_rate(rows)[0] == 400
    slow = [_row(100, 10, 30), _row(200, 20, 60), _row(300, 50, 900, errors=3)]
    rate, rule = sl.overload_rate(slow)
    assert sl.capacity(slow) is None and rate == 400 and "highest with 0 errors" in rule
    rate, rule = sl.overload_rate([_row(300, 50, 900, errors=3), _row(100, 50, 900, errors=1)])
    assert rate == 200 and "lowest" in rule


def test_overload_summary_judges_fast_shedding(sl):
    row = _row(800, 6.0, 18.0, errors=9000)
    row.update(requests=24000, ok=15000, error_classes={"503": 9000, "timeout": 0, "other": 0},
               non_200_latency_ms={"503": {"n": 9000, "p50_ms": 2.0, "p99_ms": 9.0, "max_ms": 40.0}})
    o = sl.overload_summary(row, "2 x 400 rps")
    assert o["shed_share"] == 0.375 and o["p50_503_ms"] == 2.0 and o["p99_503_ms"] == 9.0  # 9000 / 24000
    assert o["p50_200_ms"] == 6.0 and o["p99_200_ms"] == 18.0 and o["met"]
    row["error_classes"] = {"503": 8990, "timeout": 10, "other": 0}  # a single timeout: queued into seconds
    assert not sl.overload_summary(row, "")["met"]
    row["error_classes"] = {"503": 9000, "timeout": 0, "other": 0}
    row["p99_ms"] = 2500.0  # admitted requests waited seconds
    assert not sl.overload_summary(row, "")["met"]
    row.update(p99_ms=18.0, non_200_latency_ms={"503": {"n": 9000, "p50_ms": 40.0, "p99_ms": 350.0, "max_ms": 900.0}})
    assert not sl.overload_summary(row, "")["met"]  # 503s slower than 100 ms: not shed within milliseconds


def test_goals_per_diversity(sl):
    g = sl.goals(_results())
    p99 = g["p99_at_300rps"]
    assert p99["per_diversity"]["none"]["met"] and not p99["per_diversity"]["0.5"]["met"] and not p99["met"]  # MMR on: p99 25 ms at 300
    vs = g["p99_vs_noop"]  # judged where noop had 0 errors: 100 and 300 rps, both diversities; 1.6, 1.75, 2.5 > 1.5
    assert {(r["diversity"], r["rps"]) for r in vs["rows"]} == {(None, 100), (None, 300), (0.5, 100), (0.5, 300)} and not vs["met"]
    over = g["median_overhead_vs_in_process"]  # rates <= 300: 2.5, 3.5, 3.0, 4.5 ms
    assert [r["p50_minus_in_process_ms"] for r in over["rows"]] == [2.5, 3.5, 3.0, 4.5] and not over["met"]
    good = {"in_process": [{"diversity": None, "p50_ms": 0.5}], "noop": [_row(300, 3.0, 10.0)], "ray": [_row(300, 3.0, 14.0)]}
    g = sl.goals(good, overload={"met": True})
    assert all(v["met"] for v in g.values()) and set(g) == {"p99_at_300rps", "p99_vs_noop", "median_overhead_vs_in_process", "overload_sheds_fast"}
    assert sl.goals({"noop": [_row(300, 3.0, 10.0)]}) == {}  # no trustrec rows: nothing to judge


def test_model_flags_of_the_http_benchmarks(sl):
    import servers  # benchmarks/ is on sys.path once serve_load.py is loaded

    from tests.conftest import REPO

    p = argparse.ArgumentParser()
    servers.model_flags(p, ingress=True)
    args = p.parse_args(["--model", "models:/trustrec@champion"])
    assert (args.model, args.tracking_uri, args.store_url, args.ingress) == ("models:/trustrec@champion", None, None, "haproxy")
    assert args.config == str(REPO / "configs" / "serve.yaml")
    with pytest.raises(SystemExit):
        p.parse_args(["--ingress", "nginx"])
    bare = argparse.ArgumentParser()
    servers.model_flags(bare)  # fuzz.py: no --ingress
    assert not hasattr(bare.parse_args([]), "ingress")


def test_noop_options_copy_the_model_deployment_shape(sl):
    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    options, logging_config = sl.noop_options(raw)
    model = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "Model")
    assert options == {k: model[k] for k in ("num_replicas", "max_ongoing_requests", "max_queued_requests", "ray_actor_options")}
    assert options["num_replicas"] == 2 and logging_config["enable_access_log"] is False
    assert sl.noop_options({"applications": [{"name": "trustrec"}]}) == ({}, {})


def test_table_has_a_line_per_target_diversity_and_rate(sl):
    lines = sl.table_lines(_results())
    assert len(lines) == 1 + 2 + 3 + 5  # header, in-process x 2, noop x 3, ray x 5
    ray_300_mmr = next(line for line in lines if line.split()[:3] == ["ray", "0.5", "300"])
    assert ray_300_mmr.split()[-2:] == ["2.50x", "+4.50"]


@pytest.mark.ray
def test_noop_app_answers_through_haproxy(sl, srv):
    import requests

    from tests.conftest import REPO

    with sl.noop_serve(REPO / "configs" / "serve.yaml", num_cpus=2, ingress="haproxy") as url:
        for _ in range(3):
            r = requests.post(f"{url}/v1/recommend", json={"user_id": "u1", "k": 10}, timeout=30)
            assert r.status_code == 200 and r.json() == sl.NOOP_BODY
        out = _run(srv.open_loop(url, ["u1"], 10, rate=50, duration=1.0, timeout=10))
        assert out["requests"] == out["ok"] == 50
