"""Latency from a consent change to the changed answer, over real HTTP on a real Ray Serve app.

    python benchmarks/consent_latency.py                      # trains a tiny synthetic model first (~1 min)
    python benchmarks/consent_latency.py --flips 200
    python benchmarks/consent_latency.py --config configs/serve.yaml --user u1   # an existing model and store

Each flip: PUT /v1/users/{user}/consent {"personalization": <not current>}, then POST /v1/recommend
for the same user until `personalized` shows the new state. Reported per flip: the PUT alone, and
from sending the PUT to receiving the first changed answer (p50 / p95 / max), plus how many
flips were visible on the very next request (the design reads consent per request, so all of
them should be). Goal: < 1 s. Prints a table and writes JSON (default
benchmarks/results/consent_latency.json) with the command and the machine.

The store is a private copy (the benchmark flips consent and must not touch a real store), and
the auth secret is a random one made for this run unless TRUSTREC_TOKEN_SECRET is set.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from harness import REPO  # noqa: E402

GOAL_MS = 1000.0


def percentiles(values: list[float]) -> dict:
    return harness.stats(values, ("p50", "p95", "max", "mean", "n"), suffix="", digits=None)


def copy_store(url: str, dst: Path) -> str:
    src_path = url[len("sqlite:///") :]
    src, out = sqlite3.connect(src_path), sqlite3.connect(dst)
    src.backup(out)  # consistent even while another process writes (WAL)
    src.close(), out.close()
    return f"sqlite:///{dst}"


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "consent_latency")
    p.add_argument("--config", help="Ray Serve config with an existing model and store (default: train a tiny synthetic model)")
    p.add_argument("--user", default="u1", help="user whose consent flips (default u1)")
    p.add_argument("--flips", type=int, default=50, help="consent changes measured (default 50)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy", help="HTTP data plane (default haproxy, as `trustrec serve`)")
    args = p.parse_args(argv)

    import requests
    import yaml

    os.environ.setdefault("TRUSTREC_TOKEN_SECRET", secrets.token_hex(16))  # before Ray starts: replicas inherit it
    import servers  # sibling script
    from serving.auth import user_token

    with contextlib.ExitStack() as stack:
        if args.config:  # its model (None: the one its Model deployment names), registry and store
            app_args = servers.trustrec_app(yaml.safe_load(Path(args.config).read_text()))["args"]
            model = servers.Model(app_args.get("model_uri"), app_args["tracking_uri"], app_args["store_url"])
        else:
            model = stack.enter_context(servers.prepared_model(argparse.Namespace(model=None)))
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="consent-latency-")))
        model = replace(model, store_url=copy_store(model.store_url, root / "bench-features.db"))
        url = stack.enter_context(servers.ray_serve(args.config or REPO / "configs" / "serve.yaml", model, ingress=args.ingress))

        session = requests.Session()
        headers = {"Authorization": f"Bearer {user_token(os.environ['TRUSTREC_TOKEN_SECRET'], args.user)}"}
        body = {"user_id": args.user, "k": args.k}
        recommend = lambda: session.post(f"{url}/v1/recommend", json=body, timeout=30).json()  # noqa: E731
        state = recommend()["personalized"]
        if not state:
            raise SystemExit(f"user {args.user} is not personalized to begin with; pick a user the model knows (--user)")
        rec_ms = []
        for _ in range(20):  # plain request latency, for scale
            t = time.perf_counter()
            recommend()
            rec_ms.append((time.perf_counter() - t) * 1000)
        put_ms, change_ms, polls = [], [], []
        for _ in range(args.flips):
            target = not state
            t0 = time.perf_counter()
            r = session.put(f"{url}/v1/users/{args.user}/consent", json={"personalization": target}, headers=headers, timeout=30)
            r.raise_for_status()
            put_ms.append((time.perf_counter() - t0) * 1000)
            n = 0
            while True:
                n += 1
                if recommend()["personalized"] == target:
                    break
            change_ms.append((time.perf_counter() - t0) * 1000)
            polls.append(n)
            state = target

    result = {
        "flips": args.flips,
        "ingress": args.ingress,
        "consent_change_to_changed_answer_ms": percentiles(change_ms),
        "put_consent_ms": percentiles(put_ms),
        "recommend_ms": percentiles(rec_ms),
        "changed_on_the_very_next_request": sum(n == 1 for n in polls) / len(polls),
        "goal_ms": GOAL_MS,
        "meets_goal_p95": percentiles(change_ms)["p95"] < GOAL_MS,
    }
    print(f"{'':<36}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for label, key in (("consent PUT -> changed answer", "consent_change_to_changed_answer_ms"), ("consent PUT alone", "put_consent_ms"), ("POST /v1/recommend", "recommend_ms")):
        s = result[key]
        print(f"{label:<36}{s['p50']:>10.1f}{s['p95']:>10.1f}{s['max']:>10.1f}")
    print(f"changed on the very next request: {result['changed_on_the_very_next_request']:.0%} of {args.flips} flips; goal p95 < {GOAL_MS:.0f} ms: {'met' if result['meets_goal_p95'] else 'MISSED'}")
    out = harness.write(result, args, "consent_latency", script=__file__, argv=argv, libraries=["ray", "onnxruntime"])
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
