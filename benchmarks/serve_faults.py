"""Fault injection on the Ray Serve app: kill a model replica under load, count failed requests and
time the recovery, on 127.0.0.1.

    python benchmarks/serve_faults.py                          # trains a small model; 50 rps, 3 kills, HAProxy ingress
    python benchmarks/serve_faults.py --rate 200 --kills 5 --interval 15
    python benchmarks/serve_faults.py --ingress proxy          # Ray Serve's Python proxy instead
    python benchmarks/serve_faults.py --model models:/trustrec@champion --tracking-uri sqlite:///mlflow.db \
        --store-url sqlite:///data/features.db

configs/serve.yaml as is (2 replicas of the one `Model` deployment, 0.5 CPU each; a request in
flight on the killed replica fails, the ingress routes the rest to the live one), behind `--ingress`:
`haproxy` (default; Ray Serve 2.60's HAProxy straight to the replicas' HTTP ports, serving/ingress.py:
HAProxy marks a replica down on connection errors and by health check) or `proxy` (Ray's Python
proxy actor and its router). Ray 2.60 token auth: a private 0600 token for the run unless
RAY_AUTH_* is set (servers.private_ray_token). Load is open loop:
request i is sent at t0 + i / rate (servers.open_loop_run), whatever happened to earlier ones. Every
`--interval` seconds one live model replica actor is killed with `ray.kill` (found by name,
SERVE_REPLICA::trustrec#Model#...). Per kill:
  failed       non-200 answers or transport errors among the requests sent from the kill until
               recovery + 1 s (and over the whole run)
  recovery_s   from the kill until Serve reports the model deployment HEALTHY with all its
               replicas RUNNING again and a replacement actor alive
Goals (issues 6, 14): <= 1 % failed requests, recovery <= 10 s. Prints a table, writes JSON (default
benchmarks/results/serve_faults.json). Timings depend on machine load.

tests/serving/test_faults.py runs the same functions (loaded by path) with loose bounds.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
import servers  # noqa: E402

FAILED_GOAL, RECOVERY_GOAL_S = 0.01, 10.0
APP, MODEL = "trustrec", "Model"
REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#{MODEL}#"


class OpenLoop(threading.Thread):
    """servers.open_loop_run in a thread of its own until stop() (30 s timeout per request): every outcome recorded."""

    def __init__(self, url: str, rate: float, users: list[str], k: int = 10) -> None:
        self.outcomes: list[servers.Outcome] = []
        self.halt = threading.Event()
        load = {"stop": self.halt, "outcomes": self.outcomes}
        super().__init__(target=servers.open_loop_run, args=(url, users, k, rate, 24 * 3600.0, 30.0), kwargs=load, daemon=True)  # a day at most

    def start(self) -> "OpenLoop":
        super().start()
        return self

    def stop(self) -> None:
        """Stop sending; returns once every request sent has answered (or timed out)."""
        self.halt.set()
        self.join()


def model_replicas() -> list[str]:
    """Names of the model deployment's replica actors alive now (GCS; needs no dashboard)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(REPLICA_PREFIX))


def model_status() -> tuple[str, dict]:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get(MODEL) if app else None
    return (dep.status if dep else "MISSING"), dict(dep.replica_states) if dep else {}


def wait_healthy(n_replicas: int, killed: str | None = None, timeout_s: float = 180.0) -> float:
    """Seconds from now until the model deployment is HEALTHY with `n_replicas` RUNNING and, given `killed`, that replica gone
    and replaced (a busy machine may also fail a health check and replace one)."""
    start = time.monotonic()
    while model_status() != ("HEALTHY", {"RUNNING": n_replicas}) or killed in (names := model_replicas()) or len(names) != n_replicas:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"model deployment not healthy {timeout_s:.0f}s after killing {killed}: {model_status()}")
        time.sleep(0.05)
    return time.monotonic() - start


def inject() -> dict:
    """Kill one model replica (under load) and wait for Serve to replace it; returns when and how long."""
    import ray

    before = model_replicas()
    if not before:
        raise RuntimeError(f"no {REPLICA_PREFIX}* actor alive")
    victim = before[0]
    t_kill = time.perf_counter()  # the clock of Outcome.sent_at
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return {"killed": victim.rsplit("#", 1)[-1], "t_kill": t_kill, "recovery_s": round(wait_healthy(len(before), victim, 120.0), 3)}


def window(load: OpenLoop, event: dict, settle_s: float = 1.0) -> dict:
    """The requests sent from the kill until recovery + settle_s, and how many failed. Call after
    load.stop(): a request is recorded when it has answered, and under backlog that is later."""
    window = [o for o in load.outcomes if event["t_kill"] <= o.sent_at < event["t_kill"] + event["recovery_s"] + settle_s]
    failed = [o for o in window if not o.ok]
    return {"requests_in_window": len(window), "failed_in_window": len(failed), "failures": sorted({o.detail for o in failed})[:5]}


def run(url: str, users: list[str], rate: float, kills: int, interval: float, warmup: float, k: int = 10) -> dict:
    load = OpenLoop(url, rate, users, k).start()
    t0, events = time.perf_counter(), []
    try:
        time.sleep(warmup)
        for _ in range(kills):
            events.append(inject())
            print(f"  killed replica {events[-1]['killed']}: recovered in {events[-1]['recovery_s']:.2f} s", flush=True)
            time.sleep(max(interval - events[-1]["recovery_s"], 0))
    finally:
        load.stop()  # waits for every request sent to answer
    for e in events:
        e.update(window(load, e))
        e["t_kill_s"] = round(e.pop("t_kill") - t0, 3)
    done = list(load.outcomes)
    failed = [o for o in done if not o.ok]
    latencies = [o.latency_ms for o in done if o.ok]
    return {"rate_rps": rate, "requests": len(done), "failed": len(failed), "failed_pct": round(100.0 * len(failed) / max(len(done), 1), 3),
            **harness.stats(latencies, ("p50", "p99")), "max_recovery_s": max((e["recovery_s"] for e in events), default=None), "kills": events}


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.split("\n\n")[0], "serve_faults")
    servers.model_flags(p, ingress=True)
    p.add_argument("--rate", type=float, default=50.0, help="requests per second, open loop (default 50: sustainable on 2 busy cores; raise it on a quiet machine)")
    p.add_argument("--kills", type=int, default=3, help="replica kills, one after the other (default 3)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds from one kill to the next (default 15)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first kill (default 5)")
    args = p.parse_args(argv)

    with servers.private_ray_token(), servers.prepared_model(args) as model, servers.ray_serve(args.config, model, ingress=args.ingress) as url:
        from serving.recommender import Recommender

        rec = Recommender.from_uri(model.uri, None, model.tracking_uri)
        users = list(rec.user_vocab.ids[:500]) + [f"unknown-{i}" for i in range(25)]
        print(f"{url} ({args.ingress}): {len(model_replicas())} model replicas; {args.rate:.0f} rps, {args.kills} kills every {args.interval:.0f} s", flush=True)
        result = run(url, users, args.rate, args.kills, args.interval, args.warmup)

    report = {"config": str(args.config), "ingress": args.ingress, "ray": harness.version("ray"),
              "goals": {"failed_pct_max": FAILED_GOAL * 100, "recovery_s_max": RECOVERY_GOAL_S}, "result": result}
    out = harness.write(report, args, "serve_faults", script=__file__, argv=argv, libraries=["ray", "aiohttp"])

    r = result
    print(f"\nreplica kills, ingress {args.ingress}, ray {report['ray']}")
    print(f"| rate rps | requests | failed | failed % (goal ≤ {FAILED_GOAL * 100:.0f}) | max recovery s (goal ≤ {RECOVERY_GOAL_S:.0f}) | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['rate_rps']:.0f} | {r['requests']} | {r['failed']} | {r['failed_pct']:.2f} | {r['max_recovery_s']} | {r['p50_ms']} | {r['p99_ms']} |")
    print("\n| kill | replica | recovery s | failed / requests in window |")
    print("|---:|---|---:|---:|")
    for i, e in enumerate(r["kills"], 1):
        print(f"| {i} | {e['killed']} | {e['recovery_s']:.2f} | {e['failed_in_window']} / {e['requests_in_window']} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
