"""Open-loop HTTP load on Ray Serve, side by side with three baselines, on 127.0.0.1.

    python benchmarks/serve_load.py --overload                        # the issue-14 run: all targets, HAProxy,
                                                                      # 100-600 rps x 60 s, MMR off and on, then 2x capacity
    python benchmarks/serve_load.py --duration 10 --rates 100 300     # quick
    python benchmarks/serve_load.py --ingress proxy --targets ray --rates 100 300 --duration 30   # Ray's Python proxy
    python benchmarks/serve_load.py --model models:/trustrec@champion --tracking-uri sqlite:///mlflow.db \
        --store-url sqlite:///data/features.db                        # an existing registry + store

Open loop: request i is sent at t0 + i / rate whatever happened to the earlier ones (asyncio +
aiohttp), and its latency is counted from that scheduled time, so a server (or client) that
falls behind shows up in the percentiles instead of silently lowering the rate. Each rate runs
`--duration` seconds (at most rate x duration requests); responses still missing `--timeout`
seconds after the last send are counted as errors, so every step is bounded in count and time.

Targets, one after the other (never two at once), all with the same user ids (known users, plus
5 % unknown ones that get the popularity list):
  in-process   `Recommender.recommend` called in a loop (no HTTP): the floor, per --diversity
  noop         a Ray Serve app of the same shape as configs/serve.yaml's (FastAPI ingress, the
               Model deployment's replicas, max_ongoing_requests, max_queued_requests, CPUs, no
               access log) whose POST /v1/recommend returns a constant small JSON: no model, no
               store. The Ray engine's own limit on this machine, through the same --ingress
  bare         benchmarks/bare_server.py: FastAPI + ONNX Runtime under uvicorn, no Ray (MMR: the
               first --diversity value only)
  ray          trustrec: serving.launch.start(configs/serve.yaml, ingress=--ingress), the production
               app; once per --diversity value ("none": the config's default, MMR off; 0.5: every
               request carries "diversity": 0.5, MMR on), one Ray start for all of them
`--ingress haproxy` (default) is Ray Serve 2.60's HAProxy in front of the replicas' own HTTP ports
(serving/ingress.py); `proxy` is Ray Serve's Python HTTP proxy actor.

Warm-up (each target, each trustrec pass): every user id the stream repeats, once (the first-visit
latency: a store read and a model call; reported beside the table), then 3 more times each, all at
300 rps, so that each replica's per-user cache holds the population before any rate is measured;
then `--warmup` seconds at the first rate. The rates measure that steady state.

Per (target, diversity, rate): p50/p95/p99/max of the 200 answers, errors by class (503 = shed,
timeout, other), achieved rate, and the latency of non-200 answers by status. Ratios: trustrec p99 /
noop p99 at the same rate, trustrec p50 - in-process p50 (same diversity). `--overload`: after the
sweep, trustrec's capacity is the highest rate with 0 errors and p99 <= 20 ms (first diversity);
2x that rate runs `--overload-duration` s and reports the share of 503s and the p50/p99 of the 503
answers and of the 200 answers: does it shed within milliseconds, or queue into seconds?

Goals (issue 14, 2 cores): trustrec p99 <= 20 ms with 0 errors at >= 300 rps; trustrec p99 <= 1.5x
the noop app's at the same rate (rates where noop itself had no error); trustrec p50 - in-process
p50 <= 3 ms (rates <= 300); at 2x capacity shed with 503, no timeouts, 503 p99 <= 100 ms and
200 p99 <= 1 s. Prints a table, writes JSON (default benchmarks/results/serve_load.json, with
"command" and "machine"). Timings depend on machine load: the load client shares the cores.

Without --model, a small synthetic two-tower model is trained into a temporary directory
(benchmarks/servers.py, shared with serve_faults.py, fuzz.py and consent_latency.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
import servers  # noqa: E402
from servers import open_loop_run, settle  # noqa: E402

P99_GOAL_MS, RATE_GOAL, OVERHEAD_GOAL_MS, NOOP_RATIO_GOAL = 20.0, 300, 3.0, 1.5
SHED_P99_GOAL_MS, OVERLOAD_OK_P99_GOAL_MS = 100.0, 1000.0  # at 2x capacity: 503s within milliseconds, no answer queued for seconds
TARGETS = ("in-process", "noop", "bare", "ray")
WARM_VISITS, WARM_RATE = 3, 300  # warm-up: each distinct user 1 + 3 times at 300 rps (every replica sees each user; see warm_up)
NOOP_BODY = {"user_id": "noop", "items": [], "model_version": "noop"}  # what the no-op app answers, whatever was asked
NOOP_COPIED = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "ray_actor_options")  # from the Model deployment (noop_options)


def noop_options(raw: dict) -> tuple[dict, dict]:
    """(deployment options, logging config) of the no-op app: the config's Model deployment's
    admission control and CPUs, its app's logging config (access log off)."""
    app = servers.trustrec_app(raw)
    model = next((d for d in app.get("deployments") or [] if d.get("name") == "Model"), {})
    options = {k: model[k] for k in NOOP_COPIED if k in model}
    logging_config = app.get("logging_config") or raw.get("logging_config") or {}
    return options, dict(logging_config)


def noop_app(options: dict, logging_config: dict):
    """A FastAPI-ingress Ray Serve deployment answering POST /v1/recommend with NOOP_BODY (body
    unread, no model, no store) and GET /healthz with {"status": "ok"}. Built inside a function so
    that Ray pickles it by value (replicas cannot import this script)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI(title="noop")
    body = dict(NOOP_BODY)

    @serve.deployment(name="Noop", logging_config=logging_config or None)
    @serve.ingress(api)
    class Noop:
        @api.post("/v1/recommend")
        async def recommend(self):
            return body

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok"}

    return Noop.options(**options).bind()


@contextlib.contextmanager
def noop_serve(config: str | Path, num_cpus: int | None = None, ingress: str = "haproxy") -> Iterator[str]:
    """The no-op app on a Ray of our own, started the way serving.launch.start starts trustrec's
    (loopback-only node, token auth, `ingress` configured before ray.init, HeadOnly HTTP on
    127.0.0.1, the same global logging config); yields the base URL once /healthz answers."""
    import yaml

    from serving import launch
    from serving.ingress import configure, free_port

    os.environ.setdefault("RAY_ADDRESS", "local")
    raw = yaml.safe_load(Path(config).read_text())
    options, logging_config = noop_options(raw)
    port = free_port()
    launch.local_only_ray()
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    if ray.is_initialized():
        raise RuntimeError("noop_serve starts its own Ray; one is already running in this process")
    try:
        launch.ray_token_auth(port)
        # the same edge admission as trustrec's (HAProxy: maxconn per replica, bounded queue); launch.stop() removes it
        launch._started["ingress_dir"] = configure(ingress, options.get("max_ongoing_requests"), options.get("max_queued_requests"))
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="serve")
        serve_start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"}, global_logging_config=raw.get("logging_config"))
        serve.run(noop_app(options, logging_config), name="noop", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        launch._wait_healthy(url)
        yield url
    finally:
        launch.stop()


def user_ids(recommender, n: int, seed: int) -> list[str]:
    """n request user ids: known users (uniformly) and 5 % never-seen ids (popularity path)."""
    rng = np.random.default_rng(seed)
    known = list(recommender.user_vocab.ids)
    picks, new = rng.integers(0, len(known), size=n), rng.random(n) < 0.05
    return [f"new-user-{i}" if new[i] else known[j] for i, j in enumerate(picks)]


def parse_diversity(value: str) -> float | None:
    """--diversity values: "none" (no field in the request: the config's default, MMR off) or an MMR lambda in [0, 1]."""
    if value.lower() == "none":
        return None
    d = float(value)
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"diversity {value}: 'none' or a number in [0, 1]")
    return d


def in_process(recommender, users: list[str], k: int, diversity: float | None = None) -> dict:
    """Closed loop over `Recommender.recommend`: the floor any server adds its overhead to (after
    one call per distinct user: the same steady state as the HTTP targets' warm-up)."""

    def timed(ids) -> dict:
        lat, started = [], time.perf_counter()
        for u in ids:
            t = time.perf_counter()
            recommender.recommend(u, k, True, diversity)
            lat.append((time.perf_counter() - t) * 1e3)
        return servers.summarize(lat, 0, len(lat), time.perf_counter() - started)

    first_visit = timed(dict.fromkeys(users))  # the first visits: a store read and a model call each (reported)
    return {"diversity": diversity, **timed(users), "first_visit": first_visit}


def warm_up(url: str, users: list[str], k: int, timeout: float, diversity: float | None) -> dict:
    """The module doc's warm-up: every user the stream repeats once (the first visits, returned: a store read and a model
    call each), then WARM_VISITS more times each; never-seen ids (sent once) stay misses. noop and bare get the same."""
    counts = Counter(users)
    distinct = [u for u in counts if counts[u] > 1]  # an id the stream sends once (never-seen users) cannot hit a cache
    first = open_loop_run(url, distinct, k, WARM_RATE, len(distinct) / WARM_RATE, timeout, diversity)
    open_loop_run(url, distinct, k, WARM_RATE, WARM_VISITS * len(distinct) / WARM_RATE, timeout, diversity)
    return {**first, "first_visit": True}


def run_rates(url: str, users: list[str], args: argparse.Namespace, diversity: float | None, first_visits: list) -> list[dict]:
    """Warm-up, then each of --rates for --duration s from an idle server (see the module doc)."""
    first_visits.append(first := warm_up(url, users, args.k, args.timeout, diversity))
    print(f"    first visits ({first['target_rps']:.0f} rps): p50 {fmt(first['p50_ms'])}  p99 {fmt(first['p99_ms'])} ms, errors {first['errors']}", flush=True)
    open_loop_run(url, users, args.k, min(args.rates), args.warmup, args.timeout, diversity)  # warm connections at the first rate
    rows = []
    for rate in args.rates:
        waited = settle(url)
        r = open_loop_run(url, users, args.k, rate, args.duration, args.timeout, diversity)
        r["settle_s"] = waited
        print(f"    {rate:>5.0f} rps: p50 {fmt(r['p50_ms'])}  p95 {fmt(r['p95_ms'])}  p99 {fmt(r['p99_ms'])}  max {fmt(r['max_ms'])} ms, "
              f"achieved {r['achieved_rps']:.0f}/s, errors {r['errors']} {r['error_kinds'] or ''}", flush=True)
        rows.append(r)
    return rows


def fmt(ms: float | None) -> str:
    return f"{ms:.2f}" if ms is not None else "-"


def div_label(d: float | None) -> str:
    return "none" if d is None else f"{d:g}"


def at_most(value: float | None, goal: float) -> bool:
    return value is not None and value <= goal


# ----------------------------------------------------------------------------- ratios, goals, overload


def comparisons(results: dict) -> list[dict]:
    """Per trustrec row: p99 / the noop app's p99 at the same rate, and p50 - in-process p50 at the same diversity."""
    noop = {r["target_rps"]: r for r in results.get("noop", [])}
    floor = {r["diversity"]: r for r in results.get("in_process", [])}
    out = []
    for r in results.get("ray", []):
        n, ip = noop.get(r["target_rps"]), floor.get(r["diversity"])
        ratio = round(r["p99_ms"] / n["p99_ms"], 2) if n and n["p99_ms"] and r["p99_ms"] is not None else None
        diff = round(r["p50_ms"] - ip["p50_ms"], 3) if ip and r["p50_ms"] is not None and ip["p50_ms"] is not None else None
        out.append({"diversity": r["diversity"], "rps": r["target_rps"], "p99_ms": r["p99_ms"], "errors": r["errors"],
                    "noop_p99_ms": n["p99_ms"] if n else None, "noop_errors": n["errors"] if n else None,
                    "p99_over_noop": ratio, "p50_minus_in_process_ms": diff})
    return out


def meets_latency_goal(row: dict) -> bool:
    return row["errors"] == 0 and at_most(row["p99_ms"], P99_GOAL_MS)


def capacity(rows: list[dict]) -> float | None:
    """The highest rate with 0 errors and p99 <= the goal (None where no rate qualifies)."""
    ok = [r["target_rps"] for r in rows if meets_latency_goal(r)]
    return max(ok) if ok else None


def overload_rate(rows: list[dict]) -> tuple[float, str]:
    """2x capacity, and how capacity was found: the highest rate meeting the latency goal; failing
    that the highest with 0 errors; failing that the lowest rate measured."""
    cap = capacity(rows)
    if cap is not None:
        return 2 * cap, f"2 x {cap:g} rps (highest rate with 0 errors and p99 <= {P99_GOAL_MS:g} ms)"
    clean = [r["target_rps"] for r in rows if r["errors"] == 0]
    if clean:
        return 2 * max(clean), f"2 x {max(clean):g} rps (no rate met p99 <= {P99_GOAL_MS:g} ms; highest with 0 errors)"
    low = min(r["target_rps"] for r in rows)
    return 2 * low, f"2 x {low:g} rps (no rate had 0 errors; lowest measured)"


def overload_summary(row: dict, rule: str) -> dict:
    """What the 2x-capacity run shows: how much was shed with 503, how fast, and what the admitted requests waited."""
    classes = row["error_classes"]
    shed = row["non_200_latency_ms"].get("503", servers.latency_summary([]))
    out = {"rate_rps": row["target_rps"], "rule": rule, "requests": row["requests"], "diversity": row["diversity"], "shed_503": classes["503"],
           "shed_share": round(classes["503"] / row["requests"], 4) if row["requests"] else None, "timeouts": classes["timeout"],
           "other_errors": classes["other"], "p50_503_ms": shed["p50_ms"], "p99_503_ms": shed["p99_ms"], "max_503_ms": shed["max_ms"],
           "ok": row["ok"], "achieved_ok_rps": row["achieved_rps"], "p50_200_ms": row["p50_ms"], "p99_200_ms": row["p99_ms"],
           "max_200_ms": row["max_ms"], "client_send_lag_p99_ms": row.get("client_send_lag_p99_ms"), "error_kinds": row.get("error_kinds", {}),
           "body_samples": row.get("non_200_body_sample", {})}  # fmt: skip
    out["met"] = (out["timeouts"] == 0 and out["other_errors"] == 0 and (out["p99_503_ms"] is None or out["p99_503_ms"] <= SHED_P99_GOAL_MS)
                  and (out["p99_200_ms"] is None or out["p99_200_ms"] <= OVERLOAD_OK_P99_GOAL_MS))
    return out


def goals(results: dict, overload: dict | None = None) -> dict:
    """Each issue-14 goal against the figures, per diversity for trustrec."""
    ray = results.get("ray", [])
    if not ray:
        return {}
    per = {}
    for d in dict.fromkeys(r["diversity"] for r in ray):
        rows = [r for r in ray if r["diversity"] == d and r["target_rps"] >= RATE_GOAL]
        per[div_label(d)] = {"rows": [{"rps": r["target_rps"], "p99_ms": r["p99_ms"], "errors": r["errors"]} for r in rows],
                             "met": any(meets_latency_goal(r) for r in rows)}
    out = {"p99_at_300rps": {"goal": f"p99 <= {P99_GOAL_MS:g} ms and 0 errors at >= {RATE_GOAL} rps", "per_diversity": per,
                             "measured": any(v["rows"] for v in per.values()), "met": all(v["met"] for v in per.values())}}
    cmp = comparisons(results)

    def judged(goal: str, rows: list[dict], keys: tuple, ok) -> dict:
        return {"goal": goal, "rows": [{k: c[k] for k in keys} for c in rows], "measured": bool(rows), "met": bool(rows) and all(map(ok, rows))}

    if "noop" in results:  # at the rates the engine itself is within its limit (noop: 0 errors); trustrec with errors there fails
        out["p99_vs_noop"] = judged(f"trustrec p99 <= {NOOP_RATIO_GOAL:g} x noop p99 at the same rate (rates where noop had 0 errors)",
                                    [c for c in cmp if c["noop_errors"] == 0], ("diversity", "rps", "p99_over_noop", "errors"),
                                    lambda c: c["errors"] == 0 and at_most(c["p99_over_noop"], NOOP_RATIO_GOAL))
    if "in_process" in results:  # rates <= RATE_GOAL: an overloaded higher rate measures queueing, not overhead
        out["median_overhead_vs_in_process"] = judged(f"trustrec p50 - in-process p50 <= {OVERHEAD_GOAL_MS:g} ms (rates <= {RATE_GOAL})",
                                                      [c for c in cmp if c["rps"] <= RATE_GOAL], ("diversity", "rps", "p50_minus_in_process_ms"),
                                                      lambda c: at_most(c["p50_minus_in_process_ms"], OVERHEAD_GOAL_MS))
    if overload is not None:
        out["overload_sheds_fast"] = {"goal": f"at 2x capacity: 503s, no timeouts, 503 p99 <= {SHED_P99_GOAL_MS:g} ms, 200 p99 <= {OVERLOAD_OK_P99_GOAL_MS:g} ms",
                                      "measured": True, "met": overload["met"]}
    return out


def table_lines(results: dict) -> list[str]:
    """The printed table: one line per (target, diversity, rate)."""
    cmp = {(c["diversity"], c["rps"]): c for c in comparisons(results)}
    head = ["target", "div", "rate", "achvd", "p50 ms", "p95 ms", "p99 ms", "max ms", "503", "tmout", "other", "p99/noop", "p50-inproc"]
    rows = []
    for name, key in (("in-process", "in_process"), ("noop", "noop"), ("bare", "bare"), ("ray", "ray")):
        for r in results.get(key, []):
            e = r.get("error_classes", {"503": 0, "timeout": 0, "other": 0})  # in-process: no errors
            c = cmp.get((r["diversity"], r["target_rps"])) if key == "ray" else None
            ratio = f"{c['p99_over_noop']:.2f}x" if c and c["p99_over_noop"] is not None else None
            diff = f"{c['p50_minus_in_process_ms']:+.2f}" if c and c["p50_minus_in_process_ms"] is not None else None
            rate = f"{r['target_rps']:.0f}" if "target_rps" in r else None
            rows.append([name, div_label(r["diversity"]), rate, round(r["achieved_rps"]), r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"],
                         e["503"], e["timeout"], e["other"], ratio, diff])  # fmt: skip
    return harness.table(head, rows, digits=2, first=12, width=11).splitlines()


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "serve_load")
    servers.model_flags(p, ingress=True)
    p.add_argument("--rates", type=float, nargs="+", default=[100, 200, 300, 400, 600], help="request rates, per second (default 100 200 300 400 600)")
    p.add_argument("--duration", type=float, default=60, help="seconds per rate (default 60)")
    p.add_argument("--diversity", type=parse_diversity, nargs="+", default=[None, 0.5],
                   help="trustrec passes: 'none' (no diversity field: MMR off) and/or MMR lambdas (default: none 0.5)")
    p.add_argument("--timeout", type=float, default=10, help="per-request timeout and drain bound after the last send, s (default 10)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of warm-up load before each target and pass (default 3)")
    p.add_argument("--k", type=int, default=10, help="k per request (default 10)")
    p.add_argument("--in-process-calls", type=int, default=2000, help="Recommender.recommend calls per diversity for the in-process baseline (default 2000)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--overload", action="store_true", help="after the sweep, run trustrec at 2x its capacity (first diversity) and report the shedding")
    p.add_argument("--overload-duration", type=float, default=30, help="seconds of the overload run (default 30)")
    p.add_argument("--overload-rates", type=float, nargs="+", default=[],
                   help="with --overload: further overload rates, run after the 2x-capacity one (reported, not judged)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.duration <= 0 or args.overload_duration <= 0 or any(r <= 0 for r in [*args.rates, *args.overload_rates]):
        p.error("--duration, --overload-duration and the rates must be positive")
    if args.overload and "ray" not in args.targets:
        p.error("--overload needs the ray target")

    from features.store import FeatureStore
    from serving.recommender import Recommender

    started, date = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # the JSON's date: when the run began (UTC)
    results: dict[str, list] = {}
    first_visits: dict[str, list] = {}  # per target: the warm-up's first pass (every user once: cache misses)
    overloads = []
    with servers.private_ray_token(), servers.prepared_model(args) as model:
        store = FeatureStore(model.store_url) if model.store_url else None
        recommender = Recommender.from_uri(model.uri, store, model.tracking_uri)
        max_rate = max(*args.rates, *args.overload_rates, 2 * max(args.rates) if args.overload else 0)
        users = user_ids(recommender, max(int(max_rate * max(args.duration, args.overload_duration)), args.in_process_calls), args.seed)
        n_items = len(recommender.items)
        if "in-process" in args.targets:
            results["in_process"] = []
            for d in args.diversity:
                print(f"in-process Recommender.recommend, diversity {div_label(d)} ...", flush=True)
                results["in_process"].append(r := in_process(recommender, users[: args.in_process_calls], args.k, d))
                print(f"    p50 {r['p50_ms']:.2f}  p99 {r['p99_ms']:.2f} ms (first visits: p50 {r['first_visit']['p50_ms']:.2f}  p99 {r['first_visit']['p99_ms']:.2f} ms)", flush=True)
        del recommender
        if store is not None:
            store.close()
        if "noop" in args.targets:
            print(f"no-op Ray Serve app (same deployment shape, {args.ingress}) ...", flush=True)
            with noop_serve(args.config, ingress=args.ingress) as url:
                results["noop"] = run_rates(url, users, args, None, first_visits.setdefault("noop", []))
        if "bare" in args.targets:
            print("bare FastAPI + ONNX Runtime (uvicorn, no Ray) ...", flush=True)
            with servers.bare_server(model) as url:
                results["bare"] = run_rates(url, users, args, args.diversity[0], first_visits.setdefault("bare", []))
        if "ray" in args.targets:
            print(f"trustrec on Ray Serve ({Path(args.config).name}, {args.ingress}) ...", flush=True)
            with servers.ray_serve(args.config, model, ingress=args.ingress) as url:
                results["ray"] = []
                for d in args.diversity:
                    print(f"  diversity {div_label(d)}", flush=True)
                    results["ray"] += run_rates(url, users, args, d, first_visits.setdefault("ray", []))
                if args.overload:
                    rate, rule = overload_rate([r for r in results["ray"] if r["diversity"] == args.diversity[0]])
                    for rate, rule in [(rate, rule), *((extra, "--overload-rates") for extra in args.overload_rates)]:
                        print(f"  overload: {rule}: {rate:g} rps for {args.overload_duration:g} s", flush=True)
                        settle(url)
                        row = open_loop_run(url, users, args.k, rate, args.overload_duration, args.timeout, args.diversity[0])
                        overloads.append({**overload_summary(row, rule), "raw": row})
    overload = overloads[0] if overloads else None  # the 2x-capacity run, the --overload-rates runs under "more"
    if len(overloads) > 1:
        overload["more"] = overloads[1:]

    g = goals(results, overload)
    # load_average_1m > cores: other work shared the machine, timings are inflated; every target and pass runs --rates
    # (noop_rates and diversity_rates stay for readers of older JSON)
    report = {"date": date, "load_average_1m": round(os.getloadavg()[0], 2), "ingress": args.ingress, "ray": harness.version("ray"),
              "rates": args.rates, "noop_rates": args.rates, "diversity_rates": args.rates, "diversity": args.diversity,
              "duration_s": args.duration, "k": args.k, "n_items": n_items, "config": harness.repo_relative(args.config),
              "model": "trained small synthetic model" if not args.model else "given by --model", "results": results, "first_visits": first_visits,
              "warm_up": f"each distinct user 1 + {WARM_VISITS} times at {WARM_RATE} rps before each target and pass "
                         "(benchmarks/serve_load.py warm_up)",
              "comparisons": comparisons(results), "overload": overload, "goals": g, "wall_s": round(time.monotonic() - started, 1)}  # fmt: skip
    out = harness.write(report, args, "serve_load", script=__file__, argv=argv, libraries=["ray", "aiohttp", "onnxruntime"])

    print(f"\nserve load: POST /v1/recommend k={args.k}, {n_items} items, open loop {args.duration:g} s per rate, ingress {args.ingress}, "
          f"ray {report['ray']}  ({os.cpu_count()} cores, load average {report['load_average_1m']}, {report['wall_s']:.0f} s)")
    print("\n".join(table_lines(results)))
    for o in overloads:
        print(f"  overload {o['rate_rps']:g} rps ({o['rule']}): 503 {o['shed_503']}/{o['requests']} ({100 * (o['shed_share'] or 0):.1f} %), "
              f"503 p50/p99 {fmt(o['p50_503_ms'])}/{fmt(o['p99_503_ms'])} ms; 200 x {o['ok']} p50/p99 {fmt(o['p50_200_ms'])}/{fmt(o['p99_200_ms'])} ms; "
              f"timeouts {o['timeouts']}, other {o['other_errors']}")
    for name, rows in first_visits.items():
        for r in rows:
            print(f"  first visits, {name} {div_label(r['diversity'])}: {r['requests']} requests at {r['target_rps']:.0f} rps, "
                  f"p50 {fmt(r['p50_ms'])}  p99 {fmt(r['p99_ms'])} ms, errors {r['errors']}")
    for name, goal in g.items():
        print(f"  goal {name}: {('met' if goal['met'] else 'MISSED') if goal['measured'] else 'not measured'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
