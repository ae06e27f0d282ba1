"""What an experiment adds to a recommendation: assignment, the arm's policy and the exposure log.

    python benchmarks/experiment_overhead.py                 # trains a small synthetic model first (~1 min)
    python benchmarks/experiment_overhead.py --requests 5000
    python benchmarks/experiment_overhead.py --http           # over HTTP too: Ray Serve with and without the experiment

Two replicas' model halves in one process (serving/app.py ModelServer, no HTTP: the experiment's
work is all in the batch function), the same model and store, one without an experiment and one
with two arms served by that model (one deterministic, one exploring: epsilon 0.3 over a pool of
30). Requests alternate between them, user by user, so drift hits both alike; each is timed
around the batch call for a single request. Goal (issue 18): the p50 overhead <= 1 ms.
With `--http`, the same comparison end to end: trustrec on Ray Serve (configs/serve.yaml, its
ingress) started without and with the experiment in turn, `--http-passes` times each (alternating,
so drift hits both), each pass an open-loop POST /v1/recommend load at `--rate` for `--duration` s
(servers.open_loop_run, serve_load.py's client); the HTTP overhead is the difference of the medians of
the passes' p50s. Prints a table and writes JSON (default benchmarks/results/experiment_overhead.json).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
import servers  # noqa: E402

GOAL_MS = 1.0
EXPERIMENT = {"name": "overhead", "arms": [{"name": "plain", "model": "champion"}, {"name": "explore", "model": "champion", "epsilon": 0.3, "pool": 30}]}


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "experiment_overhead")
    servers.model_flags(p, ingress=True)
    p.add_argument("--requests", type=int, default=3000, help="requests per server (default 3000)")
    p.add_argument("--http", action="store_true", help="also measure over HTTP (Ray Serve started without and with the experiment)")
    p.add_argument("--http-passes", type=int, default=2, help="HTTP passes per variant, alternating (default 2)")
    p.add_argument("--rate", type=float, default=100, help="HTTP requests per second (default 100)")
    p.add_argument("--duration", type=float, default=30, help="seconds per HTTP pass (default 30)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRUSTREC_EXPERIMENT_KEY", secrets.token_hex(24))
    # Ray reads its token settings when it is imported (serving.app imports it): set them first
    with servers.private_ray_token() if args.http else contextlib.nullcontext(), servers.prepared_model(args) as model:
        import serving.app as app_module

        base = {"store_url": model.store_url, "tracking_uri": model.tracking_uri}
        plain, with_exp = app_module.ModelServer(base), app_module.ModelServer({**base, "experiment": EXPERIMENT})
        for server in (plain, with_exp):
            asyncio.run(server.reconfigure({"model_uri": model.uri}))
        users = plain.recommender.user_vocab.ids
        times: dict[str, list[float]] = {"without": [], "with": []}
        for n in range(args.requests + 200):  # the first 200 of each warm caches and are dropped
            request = {"user_id": users[n % len(users)], "k": 10, "exclude_seen": True, "diversity": None, "explain": False}
            for name, server in (("without", plain), ("with", with_exp)) if n % 2 else (("with", with_exp), ("without", plain)):
                start = time.perf_counter()
                server._recommend_batch([request])
                if n >= 200:
                    times[name].append(1000 * (time.perf_counter() - start))
        with_exp.experiment.close()
        logged, dropped = with_exp.experiment.exposures.written, with_exp.experiment.exposures.dropped
        http = over_http(args, model, [str(u) for u in users]) if args.http else None
    rows = {name: harness.stats(values, ("p50", "p95", "p99", "mean")) for name, values in times.items()}
    overhead = rows["with"]["p50_ms"] - rows["without"]["p50_ms"]
    print(harness.table(["experiment", "p50 ms", "p95 ms", "p99 ms", "mean ms"], [[k, *v.values()] for k, v in rows.items()], digits=3))
    print(f"p50 overhead {overhead:.3f} ms (goal <= {GOAL_MS} ms); exposures written {logged}, dropped {dropped}")
    report = {"requests": args.requests, "rows": rows, "p50_overhead_ms": round(overhead, 3), "goal_ms": GOAL_MS, "met": overhead <= GOAL_MS,
              "exposures_written": logged, "exposures_dropped": dropped, "experiment": EXPERIMENT}  # fmt: skip
    if http:
        report["http"] = http
    harness.write(report, args, "experiment_overhead", script=__file__, argv=argv)
    return 0


def over_http(args, model, users: list[str]) -> dict:
    """Open-loop HTTP passes against trustrec on Ray Serve, alternately without and with EXPERIMENT."""
    passes: dict[str, list[dict]] = {"without": [], "with": []}
    order = [name for _ in range(args.http_passes) for name in ("without", "with")]
    for i, name in enumerate(order):
        with servers.ray_serve(args.config, model, ingress=args.ingress, experiment=EXPERIMENT if name == "with" else None) as url:
            servers.open_loop_run(url, users, 10, args.rate, 3.0, 10.0)  # warm connections and replicas
            servers.settle(url)
            row = servers.open_loop_run(url, users, 10, args.rate, args.duration, 10.0)
        keep = {k: row[k] for k in ("p50_ms", "p95_ms", "p99_ms", "errors", "achieved_rps")}
        print(f"  HTTP pass {i + 1}/{len(order)} {name:>7} experiment: " + ", ".join(f"{k} {v}" for k, v in keep.items()), flush=True)
        passes[name].append(keep)
    p50 = {name: statistics.median(r["p50_ms"] for r in rows) for name, rows in passes.items()}
    overhead = p50["with"] - p50["without"]
    print(f"HTTP p50 overhead {overhead:.3f} ms at {args.rate:.0f} rps (median of {args.http_passes} passes each; goal <= {GOAL_MS} ms)")
    return {"rate_rps": args.rate, "duration_s": args.duration, "ingress": args.ingress, "passes": passes,
            "p50_ms": p50, "p50_overhead_ms": round(overhead, 3), "met": overhead <= GOAL_MS}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
