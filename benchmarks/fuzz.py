"""Schemathesis fuzz of the real Ray Serve app's `/openapi.json`: every check, >= 10,000 requests.

    python benchmarks/fuzz.py                          # trains a small model, starts Ray Serve, fuzzes
    python benchmarks/fuzz.py --min-cases 2000         # a shorter run
    python benchmarks/fuzz.py --model models:/trustrec@champion --tracking-uri sqlite:///mlflow.db --store-url sqlite:///data/features.db

Three kinds of schemathesis cases, each response judged by every check of
`schemathesis.checks.CHECKS` on its own (failures are counted per check; see CHECKS below for what
each one covers here, and why two of them cannot fire against this API):
  coverage   schemathesis' coverage phase, once per operation: boundary and invalid values,
             undocumented HTTP methods (-> unsupported_method, allow_header_conformance on
             OPTIONS) and the request without the required `Authorization` header (-> missing_required_header)
  fuzzing    Hypothesis over `operation.as_strategy`, valid (positive) and invalid (negative)
             inputs, `--examples` per (operation, mode) and round, new seeds per round, until
             `--min-cases` requests were sent (at most `--max-rounds` rounds and `--time-limit` s)
  scenario   `--scenarios` recorded user lifecycles (create by consent -> event -> read -> erase ->
             read again -> write again) so the stateful checks see the DELETE (-> use_after_free)
A fresh admin token ($TRUSTREC_ADMIN_TOKEN) is sent on every request but the missing-header ones,
so the user-data routes are fuzzed past authentication; `ignored_auth` re-sends every 2xx answer
of a route whose security is required without the token and with an invalid one (both must be
401/403). Two harness probes cover what schemathesis cannot here: `optional_auth` (the open
/v1/recommend, security `[{}, {"HTTPBearer": []}]`: no token -> still 2xx, an invalid token ->
401, documented) and `cross_user_token` (object-level authorization: a genuine token of another
user -> 403 on read and erase, the owner's token -> 200; needs the user-token secret
$TRUSTREC_TOKEN_SECRET, set for the server this script starts). Probe responses go through the
response checks too but are not counted as cases.

Goal: >= --min-cases cases, 0 server errors, 0 schema violations (status code, content type,
headers, body), 0 auth mismatches (ignored_auth, missing_required_header and the two probes), 0
protocol failures (unsupported_method, allow_header_conformance, use_after_free), no request
lost (timeout or connection error, `--timeout` s each). negative_data_rejection and
positive_data_acceptance are reported, not goals (docs/BENCHMARKS.md says why they fire).
Prints a table and writes JSON (default benchmarks/results/fuzz.json) with up to 3 failing
requests per check. The fuzz edits and erases users: use a store you can lose (the default
trains its own into a temporary directory).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
import servers  # noqa: E402

# Every check of schemathesis 4.32 (`schemathesis.checks.CHECKS`) with what it covers against this API.
CHECKS = {
    "not_a_server_error": "every response: no 5xx",
    "status_code_conformance": "every response: the status is documented for the operation",
    "content_type_conformance": "every response: the Content-Type is documented",
    "response_headers_conformance": "every response: documented response headers present and valid (the schema documents none)",
    "response_schema_conformance": "every response: the body matches the documented schema",
    "negative_data_rejection": "invalid input gets a 4xx (reported, not a goal)",
    "positive_data_acceptance": "schema-valid input gets a 2xx (reported, not a goal)",
    "missing_required_header": "coverage: each secured operation without its Authorization header must get 401",
    "unsupported_method": "coverage: undocumented methods (DELETE/GET/PATCH/POST/PUT/QUERY/TRACE) on each path get 405 with Allow",
    "allow_header_conformance": "coverage: OPTIONS on each path: Allow lists exactly the documented methods",
    "use_after_free": "scenarios: a read after a successful erasure (DELETE /v1/users/{user_id}) must not succeed",
    "ensure_resource_availability": "not applicable: judges a 404 right after a POST that created something at a path prefix of the "
    "read; this API's only POST (/v1/events) is no prefix of /v1/users/{user_id}/... (users come into being by PUT "
    "consent/preferences). Run on every response, it cannot fire.",
    "ignored_auth": "every 2xx of the 5 user-data operations (security required): re-sent without the token and with an invalid "
    "one, both must be 401/403. /v1/recommend's security is optional, which this check passes by definition (see optional_auth); "
    "/healthz and /v1/model declare none",
    "object_level_authorization": "not applicable here: needs schemathesis' engine with a WFC document of several identities "
    "and its value pool (an owner's GET of an object it made earlier); cannot fire in this harness. Same property: cross_user_token",
}
PROBES = {  # harness checks (not schemathesis'): auth behaviour the schemathesis checks cannot see here
    "optional_auth": "every 2xx of POST /v1/recommend (optional security): without a token still 2xx; with an invalid bearer 401 (documented)",
    "cross_user_token": "scenarios: another user's genuine token gets 403 on GET .../data and DELETE; the owner's token gets 200",
}
NOT_APPLICABLE = ("ensure_resource_availability", "object_level_authorization")
GOALS = {
    "server errors": ("not_a_server_error",),
    "schema violations": ("status_code_conformance", "content_type_conformance", "response_headers_conformance", "response_schema_conformance"),
    "auth mismatches": ("ignored_auth", "missing_required_header", "optional_auth", "cross_user_token"),
    "protocol": ("unsupported_method", "allow_header_conformance", "use_after_free"),
}
MUST_PASS = tuple(c for group in GOALS.values() for c in group)
RESPONSE_CHECKS = ("not_a_server_error", *GOALS["schema violations"])  # what a probe's response is judged by
ADMIN_ENV = "TRUSTREC_ADMIN_TOKEN"  # serving.config.AuthArgs.admin_token_env's default
SECRET_ENV = "TRUSTREC_TOKEN_SECRET"  # ... and user_secret_env's
INVALID_BEARER = "Bearer SCHEMATHESIS-INVALID-VALUE"  # what ignored_auth sends too


def _is_missing_auth(case) -> bool:
    """A coverage case that leaves out the Authorization header on purpose (sent without our token)."""
    from schemathesis.generation.meta import CoverageScenario

    data = getattr(getattr(case.meta, "phase", None), "data", None)
    return getattr(data, "scenario", None) == CoverageScenario.MISSING_PARAMETER and str(getattr(data, "parameter", "")).lower() == "authorization"


def fuzz(url: str, examples: int, min_cases: int, seed: int, token: str | None = None, *, user_secret: str | None = None, timeout: float = 10.0,
         max_rounds: int = 20, time_limit: float | None = None, scenarios: int = 25, progress: bool = True) -> dict:
    """Fuzz a live server at `url` (the admin `token` sent on every request, so the user-data routes
    are exercised past authentication; `user_secret` enables the cross-user probe); returns counts
    per operation/phase, per status and per check, samples of failures and probe statistics."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import CHECKS as REGISTERED, load_all_checks
    from schemathesis.core import NotSet
    from schemathesis.core.failures import FailureGroup
    from schemathesis.engine.recorder import ScenarioRecorder
    from schemathesis.specs.openapi.adapter.security import has_effective_optional_auth
    from schemathesis.specs.openapi.checks import get_security_parameters
    from tqdm import tqdm

    started = time.perf_counter()
    load_all_checks()
    check_fns = {name: getattr(schemathesis.checks, name) for name in CHECKS}
    unlisted = sorted(set(REGISTERED.get_all_names()) - set(CHECKS))  # a newer schemathesis' new checks: shown, not silently skipped
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=timeout)
    operations = [r.ok() for r in schema.get_all_operations()]
    by_label = {op.label: op for op in operations}
    auth = {"Authorization": f"Bearer {token}"} if token else None
    session = requests.Session()
    transport = {"timeout": timeout}  # for the requests checks send themselves (ignored_auth's probes)

    cases: Counter = Counter()  # "METHOD /path [phase mode]" -> requests
    phases: Counter = Counter()
    statuses: Counter = Counter()
    failures: Counter = Counter()
    runs: Counter = Counter()  # responses each check judged
    by_operation: Counter = Counter()  # (check, "where -> status")
    samples: dict[str, list[str]] = defaultdict(list)
    lost: list[str] = []  # requests without a response (timeout, connection error) or that could not be sent
    check_errors: list[str] = []  # a check that raised something else than a failure (e.g. its probe timed out)
    probes: dict[str, Counter] = defaultdict(Counter)  # probe kind -> statuses
    scenario_stats: Counter = Counter()

    def describe(case, response, headers_sent) -> str:
        sent = {"query": case.query, "headers": {h: v for h, v in (case.headers or {}).items() if h.lower() != "authorization"}}
        if not isinstance(case.body, NotSet):
            sent["body"] = case.body
        who = "admin token" if headers_sent == auth and auth else "no token" if not (headers_sent or {}).get("Authorization") else "other token"
        status = response.status_code if response is not None else "no response"
        text = response.text[:200] if response is not None else ""
        return f"{case.method} {case.formatted_path} ({who}) {json.dumps(sent, default=str)[:300]} -> {status} {text}"

    def fail(name: str, where: str, status, detail: str) -> None:
        failures[name] += 1
        by_operation[(name, f"{where} -> {status}")] += 1
        if len(samples[name]) < 3:
            samples[name].append(detail[:900])

    def judge(case, response, headers_sent, where: str, names, recorder=None) -> None:
        """Each check in `names` on its own, so one response can fail several, each counted once."""
        for name in names:
            runs[name] += 1
            rec = recorder
            if name == "ignored_auth" and rec is None:  # its probes get recorded: counted and their statuses kept
                rec = ScenarioRecorder(label=where)
                rec.record_case(case=case)
                rec.record_response(case_id=case.id, response=schemathesis.Response.from_any(response))
            before = set(rec.interactions) if name == "ignored_auth" else set()
            try:
                case.validate_response(response, checks=[check_fns[name]], headers=headers_sent, transport_kwargs=dict(transport), recorder=rec)
            except FailureGroup as e:
                first = e.exceptions[0]
                fail(name, where, response.status_code, f"{describe(case, response, headers_sent)} || {first.title}: {first.message.splitlines()[0] if first.message else ''}")
            except Exception as e:  # noqa: BLE001 - e.g. a probe the check sent timed out: counted, shown, never silent
                check_errors.append(f"{name} on {describe(case, response, headers_sent)[:300]}: {type(e).__name__}: {str(e)[:200]}")
            if name == "ignored_auth":
                for cid in set(rec.interactions) - before - {case.id}:
                    r = rec.interactions[cid].response
                    probes["ignored_auth"][r.status_code if r is not None else "no response"] += 1

    def send(case, headers_sent, where: str):
        try:
            return case.call(base_url=url, session=session, headers=headers_sent, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a timeout, a refused connection, a request that cannot be built
            lost.append(f"{where}: {describe(case, None, headers_sent)[:300]}: {type(e).__name__}: {str(e)[:200]}")
            return None

    def run_case(case, where: str, bar, recorder=None, parent_id=None):
        """One schemathesis case: sent, counted, judged by every check; then the probes that apply."""
        headers_sent = None if _is_missing_auth(case) else auth
        response = send(case, headers_sent, where)
        cases[where] += 1
        phases[where.rsplit("[", 1)[-1].split()[0]] += 1
        bar.update(1)
        if response is None:
            return None
        statuses[response.status_code] += 1
        if recorder is not None:
            recorder.record_case(case=case, parent_id=parent_id)
            recorder.record_response(case_id=case.id, response=schemathesis.Response.from_any(response))
        judge(case, response, headers_sent, where, list(CHECKS), recorder)
        op = case.operation
        if (200 <= response.status_code < 300 and case.method.upper() == op.method.upper()
                and get_security_parameters(op) and has_effective_optional_auth(op, op.schema.raw_schema)):  # the optional_auth probes
            anonymous = case.derive(headers={h: v for h, v in (case.headers or {}).items() if h.lower() != "authorization"})
            probe("optional_auth", anonymous, None, where, lambda s: 200 <= s < 300, "2xx: the route is open without a token")
            probe("optional_auth", anonymous, {"Authorization": INVALID_BEARER}, where, lambda s: s == 401, "401: a token that is sent is checked")
        return response

    def probe(kind: str, case, headers_sent, where: str, expect, expectation: str) -> None:
        """A request of the harness' own: its status must satisfy `expect`; its response goes through the response checks."""
        response = send(case, headers_sent, f"{where} [probe {kind}]")
        if response is None:
            fail(kind, where, "no response", f"{describe(case, None, headers_sent)} || no response")
            return
        probes[kind][response.status_code] += 1
        runs[kind] += 1
        if not expect(response.status_code):
            fail(kind, where, response.status_code, f"{describe(case, response, headers_sent)} || expected {expectation}")
        judge(case, response, headers_sent, f"{where} [probe {kind}]", RESPONSE_CHECKS)

    def out_of_time() -> bool:
        return time_limit is not None and time.perf_counter() - started > time_limit

    with tqdm(total=min_cases, desc="fuzz cases", unit="case", disable=not progress, mininterval=2.0) as bar:
        # 1. schemathesis' coverage phase: deterministic, once per operation
        for op in operations:
            generation = schema.config.generation_for(operation=op, phase="coverage")
            for case in schema.iter_coverage_cases(op, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], generation_config=generation):
                mode = case.meta.generation.mode.value if case.meta else "?"
                label = op.label if case.method.upper() == op.method.upper() else f"{case.method.upper()} {op.path} (undocumented method)"
                run_case(case, f"{label} [coverage {mode}]", bar)

        # 2. scenarios for the stateful checks (and the cross-user probe)
        from serving.auth import user_token

        labels = {"recommend": "POST /v1/recommend", "consent": "PUT /v1/users/{user_id}/consent", "event": "POST /v1/events",
                  "data": "GET /v1/users/{user_id}/data", "delete": "DELETE /v1/users/{user_id}"}
        ops = {name: by_label.get(label) for name, label in labels.items()}
        run_tag, where, json_body = secrets.token_hex(3), "[scenario lifecycle]", "application/json"

        def step(op: str, after=None, **made):
            """A case of ops[op] made with `made`, run and recorded in this lifecycle after the case `after`: (case, response)."""
            case = ops[op].Case(**made)
            return case, run_case(case, f"{ops[op].label} {where}", bar, rec, parent_id=after.id if after else None)

        if all(ops.values()) and auth:
            for i in range(scenarios):
                user, other = f"fuzz-{run_tag}-{i}", f"fuzz-{run_tag}-{i}-other"
                rec, path, steps = ScenarioRecorder(label=f"lifecycle {i}"), {"user_id": user}, {}
                create, steps["create"] = step("consent", path_parameters=path, body={"personalization": True, "training": True}, media_type=json_body)
                _, answer = step("recommend", create, body={"user_id": user, "k": 5}, media_type=json_body)
                try:  # an item the catalog knows (an unknown one is a 422)
                    item = answer.json()["items"][0]["item_id"]
                except Exception:  # noqa: BLE001
                    item = "1"
                _, steps["event"] = step("event", create, body={"user_id": user, "item_id": item, "rating": 1.0}, media_type=json_body)
                read, steps["read"] = step("data", create, path_parameters=path)
                if user_secret:
                    as_other, as_owner = ({"Authorization": f"Bearer {user_token(user_secret, who)}"} for who in (other, user))
                    probe("cross_user_token", read, as_other, f"{ops['data'].label} {where}", lambda s: s == 403, "403: another user's token")
                    probe("cross_user_token", read, as_owner, f"{ops['data'].label} {where}", lambda s: s == 200, "200: the owner's token")
                    erase_other = ops["delete"].Case(path_parameters=path)
                    probe("cross_user_token", erase_other, as_other, f"{ops['delete'].label} {where}", lambda s: s == 403, "403: another user's token")
                erase, steps["erase"] = step("delete", read, path_parameters=path)
                _, steps["read after erase"] = step("data", erase, path_parameters=path)
                _, steps["write after erase"] = step("consent", erase, path_parameters=path, body={"training": True}, media_type=json_body)
                scenario_stats["run"] += 1
                codes = {k: (r.status_code if r is not None else None) for k, r in steps.items()}
                scenario_stats["use_after_free judged"] += all(c is not None and 200 <= c < 300 for c in (codes["create"], codes["read"], codes["erase"]))
                for k, c in codes.items():
                    scenario_stats[f"{k}: {c}"] += 1

        # 3. fuzzing phase: Hypothesis, new seeds per round, until min_cases (bounded by rounds and time)
        rounds = 0
        while sum(cases.values()) < min_cases and rounds < max_rounds and not out_of_time():
            for op in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    if sum(cases.values()) >= min_cases or out_of_time():
                        break
                    label = f"{op.label} [fuzzing {mode.value}]"

                    @hypothesis_seed(seed + rounds)
                    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                              suppress_health_check=list(HealthCheck))
                    @given(case=op.as_strategy(generation_mode=mode))
                    def test(case) -> None:
                        run_case(case, label, bar)  # called right here, in this iteration: `label` is this one's

                    try:
                        test()
                    except Exception as e:  # an operation without invalid inputs (GET /healthz) cannot be negated
                        if "nsatisfiable" not in f"{type(e).__name__} {e}":
                            raise
            rounds += 1

    checks = {name: {"failures": failures.get(name, 0), "responses_judged": runs.get(name, 0), "covers": how,
                     "applicable": name not in NOT_APPLICABLE, "goal": name in MUST_PASS} for name, how in {**CHECKS, **PROBES}.items()}
    return {"cases": dict(sorted(cases.items())), "total_cases": sum(cases.values()), "phases": dict(phases),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "failures": {c: failures.get(c, 0) for c in (*CHECKS, *PROBES)},
            "checks": checks, "schemathesis_checks_not_run": unlisted,
            "probes": {k: {"sent": sum(v.values()), "statuses": {str(s): n for s, n in sorted(v.items(), key=str)}} for k, v in probes.items()},
            "scenarios": dict(scenario_stats), "lost_requests": len(lost), "lost_samples": lost[:5], "check_errors": len(check_errors),
            "check_error_samples": check_errors[:5], "samples": dict(samples),
            "failures_by_operation": {f"{c}: {where}": n for (c, where), n in by_operation.most_common()},
            "rounds": rounds, "fuzz_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "fuzz")
    servers.model_flags(p)
    p.add_argument("--examples", type=int, default=200, help="Hypothesis examples per (operation, mode) and round (default 200)")
    p.add_argument("--min-cases", type=int, default=10000, help="keep fuzzing (new seeds each round) until this many requests (default 10000)")
    p.add_argument("--max-rounds", type=int, default=20, help="at most this many fuzzing rounds (default 20)")
    p.add_argument("--time-limit", type=float, default=3600, help="stop starting new batches after this many seconds of fuzzing (default 3600)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds (default 10); a request past it counts as lost")
    p.add_argument("--scenarios", type=int, default=25, help="recorded user lifecycles for the stateful checks (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help=f"fuzz an already running server instead of starting Ray Serve (admin token: ${ADMIN_ENV}; ${SECRET_ENV} enables the cross-user probe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    started = time.perf_counter()
    if not args.url:  # the server we start gets a fresh admin token and user-token secret (Ray's local cluster inherits
        # the environment); the fuzz edits and erases users, so point it only at a store you can lose
        os.environ.setdefault(ADMIN_ENV, secrets.token_urlsafe(24))
        os.environ.setdefault(SECRET_ENV, secrets.token_urlsafe(24))
    with contextlib.ExitStack() as stack:
        model = None if args.url else stack.enter_context(servers.prepared_model(args))
        url = args.url.rstrip("/") if args.url else stack.enter_context(servers.ray_serve(args.config, model))
        token, secret = os.environ.get(ADMIN_ENV), os.environ.get(SECRET_ENV)
        result = fuzz(url, args.examples, args.min_cases, args.seed, token, user_secret=secret, timeout=args.timeout, max_rounds=args.max_rounds,
                      time_limit=args.time_limit, scenarios=args.scenarios, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    met = (all(result["failures"][c] == 0 for c in MUST_PASS) and result["total_cases"] >= args.min_cases
           and result["lost_requests"] == 0 and result["check_errors"] == 0)
    goal = {"groups": {k: list(v) for k, v in GOALS.items()}, "must_pass": list(MUST_PASS), "min_cases": args.min_cases, "met": met}
    report = {**result, "goal": goal, "seconds": round(seconds, 1)}
    out = harness.write(report, args, "fuzz", script=__file__, argv=argv, libraries=["schemathesis", "ray"])

    print(f"\nschemathesis fuzz of /openapi.json: {result['total_cases']} cases in {seconds:.0f} s, {result['fuzz_seconds']:.0f} s fuzzing")
    print(f"  phases: {result['phases']}  fuzzing rounds: {result['rounds']}  scenarios: {result['scenarios'].get('run', 0)} "
          f"(use_after_free judged in {result['scenarios'].get('use_after_free judged', 0)})")
    print(harness.table(["case", "requests"], result["cases"].items(), first=82, width=9))
    print(f"  statuses: {result['statuses']}")
    for kind, p_ in result["probes"].items():
        print(f"  probes {kind}: {p_['sent']} sent, statuses {p_['statuses']}")
    rows = [[c, r["failures"], r["responses_judged"], "goal: 0" if r["goal"] else "reported" if r["applicable"] else "not applicable"]
            for c, r in result["checks"].items()]
    print(harness.table(["check", "failures", "judged", "counts as"], rows, first=30, width=16))
    print(f"  lost requests: {result['lost_requests']}  check errors: {result['check_errors']}")
    for where, n in list(result["failures_by_operation"].items())[:15]:
        print(f"  {n:>6}  {where}")
    for c, s in result["samples"].items():
        print(f"  e.g. {c}: {s[0][:400]}")
    for s in result["lost_samples"] + result["check_error_samples"]:
        print(f"  e.g. {s[:400]}")
    print(f"goal: 0 server errors / schema violations / auth mismatches / protocol failures, >= {args.min_cases} cases: {'met' if met else 'MISSED'}")
    print(f"wrote {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
