"""What an experiment adds to a recommendation: assignment, the arm's policy and the exposure log.

    python benchmarks/experiment_overhead.py                 # trains a small synthetic model first (~1 min)
    python benchmarks/experiment_overhead.py --requests 5000

Two replicas' model halves in one process (serving/app.py ModelServer, no HTTP: the experiment's
work is all in the batch function), the same model and store, one without an experiment and one
with two arms served by that model (one deterministic, one exploring: epsilon 0.3 over a pool of
30). Requests alternate between them, user by user, so drift hits both alike; each is timed
around the batch call for a single request. Goal (issue 18): the p50 overhead <= 1 ms.
Prints a table and writes JSON (default benchmarks/results/experiment_overhead.json).
"""
from __future__ import annotations

import asyncio
import os
import secrets
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
    servers.model_flags(p)
    p.add_argument("--requests", type=int, default=3000, help="requests per server (default 3000)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRUSTREC_EXPERIMENT_KEY", secrets.token_hex(24))
    import serving.app as app_module

    with servers.prepared_model(args) as model:
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
    rows = {name: harness.stats(values, ("p50", "p95", "p99", "mean")) for name, values in times.items()}
    overhead = rows["with"]["p50_ms"] - rows["without"]["p50_ms"]
    print(harness.table(["experiment", "p50 ms", "p95 ms", "p99 ms", "mean ms"], [[k, *v.values()] for k, v in rows.items()], digits=3))
    print(f"p50 overhead {overhead:.3f} ms (goal <= {GOAL_MS} ms); exposures written {logged}, dropped {dropped}")
    report = {"requests": args.requests, "rows": rows, "p50_overhead_ms": round(overhead, 3), "goal_ms": GOAL_MS, "met": overhead <= GOAL_MS,
              "exposures_written": logged, "exposures_dropped": dropped, "experiment": EXPERIMENT}  # fmt: skip
    harness.write(report, args, "experiment_overhead", script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
