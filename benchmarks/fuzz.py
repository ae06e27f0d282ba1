"""Schemathesis fuzz of the real Ray Serve app's `/openapi.json`: >= 1,000 generated requests.

    python benchmarks/fuzz.py                          # trains a small model, starts Ray Serve, fuzzes
    python benchmarks/fuzz.py --examples 600 --seed 1  # more cases per (operation, mode)
    python benchmarks/fuzz.py --model models:/trustrec@champion --tracking-uri sqlite:///mlflow.db --store-url sqlite:///data/features.db

Every operation of the schema is fuzzed with valid (positive) and invalid (negative) inputs,
`--examples` Hypothesis examples per (operation, mode), until at least `--min-cases` requests
were sent in all. Each response goes through each check on its own, so failures are counted
per check: not_a_server_error (no 5xx), status_code_conformance (a documented status),
content_type_conformance, response_headers_conformance, response_schema_conformance (the body
matches the documented schema), negative_data_rejection (invalid input gets a 4xx) and
positive_data_acceptance (valid input gets a 2xx). Prints a table and writes JSON (default
benchmarks/results/fuzz.json) with up to 3 failing requests per check. Goal: 0 server errors,
0 schema mismatches. The server is the same as benchmarks/serve_load.py's (`ray_serve`), with a
fresh admin token in $TRUSTREC_ADMIN_TOKEN sent on every request, so the user-data endpoints are
fuzzed past authentication. Those requests edit and erase users: use a store you can lose (the
default trains its own into a temporary directory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import add_model_flags, prepared_model, ray_serve  # noqa: E402

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
)
ADMIN_ENV = "TRUSTREC_ADMIN_TOKEN"  # serving.config.AuthArgs.admin_token_env's default
MUST_PASS = ("not_a_server_error", "status_code_conformance", "response_schema_conformance")  # the goal


def fuzz(url: str, examples: int, min_cases: int, seed: int, token: str | None = None, timeout: float = 30.0) -> dict:
    """Run the fuzz against a live server at `url` (sending `token` as the bearer, so the
    user-data endpoints are exercised past authentication); returns counts per operation/mode/check."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    checks = {name: getattr(schemathesis.checks, name) for name in CHECKS}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=timeout)
    operations = [r.ok() for r in schema.get_all_operations()]
    cases: Counter = Counter()
    statuses: Counter = Counter()
    failures: Counter = Counter()
    by_operation: Counter = Counter()  # (check, "METHOD /path [mode] -> status")
    samples: dict[str, list[str]] = defaultdict(list)
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}"} if token else None

    def run_one(case) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=timeout)
        key = f"{case.operation.label} [{case.meta.generation.mode.value if case.meta else '?'}]"
        cases[key] += 1
        statuses[response.status_code] += 1
        for name, check in checks.items():
            try:
                case.validate_response(response, checks=[check], headers=headers)
            except FailureGroup:
                failures[name] += 1
                by_operation[(name, f"{key} -> {response.status_code}")] += 1
                if len(samples[name]) < 3:
                    sent = {"path": case.path_parameters, "query": case.query, "headers": {h: v for h, v in (case.headers or {}).items() if h.lower() != "authorization"}, "body": case.body}
                    samples[name].append(f"{case.operation.label} [{key.rsplit('[', 1)[-1]} {json.dumps(sent, default=str)[:300]} -> {response.status_code} {response.text[:200]}")

    rounds = 0
    from tqdm import tqdm

    with tqdm(total=min_cases, desc="fuzz cases", unit="case") as bar:
        while sum(cases.values()) < min_cases and rounds < 10:  # bounded: at most 10 rounds of seeds
            for op in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    before = sum(cases.values())

                    @settings(
                        max_examples=examples,
                        deadline=None,
                        database=None,
                        phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=op.as_strategy(generation_mode=mode))
                    def test(case) -> None:
                        run_one(case)

                    test = hypothesis_seed(seed + rounds)(test)
                    try:
                        test()
                    except Exception as e:  # an operation without invalid inputs (GET /healthz) cannot be negated
                        if "Unsatisfiable" not in type(e).__name__ and "unsatisfiable" not in str(e).lower():
                            raise
                    bar.update(sum(cases.values()) - before)
            rounds += 1
    return {"cases": dict(cases), "total_cases": sum(cases.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())}, "failures": {c: failures.get(c, 0) for c in CHECKS}, "samples": dict(samples), "failures_by_operation": {f"{c}: {where}": n for (c, where), n in by_operation.most_common()}, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--examples", type=int, default=100, help="Hypothesis examples per (operation, mode) and round (default 100)")
    p.add_argument("--min-cases", type=int, default=1000, help="keep fuzzing (new seeds, at most 10 rounds) until this many requests (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="fuzz an already running server instead of starting Ray Serve (admin token: $TRUSTREC_ADMIN_TOKEN)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/fuzz.json)")
    args = p.parse_args(argv)

    started = time.perf_counter()
    if args.url:
        result = fuzz(args.url.rstrip("/"), args.examples, args.min_cases, args.seed, os.environ.get(ADMIN_ENV))
    else:
        # the server we start gets a fresh admin token (Ray's local cluster inherits the environment);
        # the fuzz edits and erases users, so point it only at a store you can lose (the default trains one)
        token = os.environ.setdefault(ADMIN_ENV, secrets.token_urlsafe(24))
        with prepared_model(args) as model, ray_serve(args.config, model) as url:
            result = fuzz(url, args.examples, args.min_cases, args.seed, token)
    seconds = time.perf_counter() - started
    met = all(result["failures"][c] == 0 for c in MUST_PASS)
    report = {
        **result,
        "goal": {"must_pass": list(MUST_PASS), "min_cases": args.min_cases, "met": met and result["total_cases"] >= args.min_cases},
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, schemathesis {__import__('schemathesis').__version__}",
        "command": "python benchmarks/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / "fuzz.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nschemathesis fuzz of /openapi.json: {result['total_cases']} requests in {seconds:.0f} s  ({report['machine']})")
    for key, n in sorted(result["cases"].items()):
        print(f"  {key:<40} {n:>6}")
    print(f"  statuses: {result['statuses']}")
    print(f"  {'check':<32} {'failures':>9}")
    for c in CHECKS:
        mark = "  (goal: 0)" if c in MUST_PASS else ""
        print(f"  {c:<32} {result['failures'][c]:>9}{mark}")
    for where, n in list(result["failures_by_operation"].items())[:12]:
        print(f"  {n:>6}  {where}")
    for c, s in result["samples"].items():
        print(f"  e.g. {c}: {s[0]}")
    print(f"goal: 0 server errors, responses match the schema, >= {args.min_cases} cases: {'met' if report['goal']['met'] else 'MISSED'}")
    print(f"wrote {out}")
    return 0 if report["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
