"""docs/RESULTS.md: the current figure for every goal, made from the figures of record in docs/results/.

    python benchmarks/results_page.py            # regenerate docs/RESULTS.md from docs/results/*.json
    python benchmarks/results_page.py --check    # exit 1 when docs/RESULTS.md is not what they give

A benchmark run becomes the figure of record with its `--record` flag (harness.write copies its JSON
to docs/results/<name>.json and reruns this script), or by copying its JSON there by hand. One table
per area: goal, current figure, status, command, date and machine, every cell read from a JSON; an
area whose JSON is absent says so and names the command that makes it. Nothing here is typed by
hand but the goals' wording. tests/benchmarks/test_results_page.py fails when the committed page and the JSON disagree.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from privacy import RATIO_GOALS as PRIVACY_SHARE_GOALS  # noqa: E402  (eps -> share of the best non-private NDCG@10)

PAGE = harness.REPO / "docs" / "RESULTS.md"
TIME_TO_TARGET_S = 60.0  # issue 3: test NDCG@10 >= the target within 60 s of training on 2 cores
Row = tuple[str, str, str]  # goal, current figure, status


def met(ok: bool | None) -> str:
    return "reported" if ok is None else "met" if ok else "**not met**"


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f} %"


def pm(m: dict, key: str) -> str:
    """'0.4737 ± 0.0023' (mean ± std over seeds), or the bare mean when the std is 0 / absent."""
    std = m.get(f"{key}_std")
    return f"{m[key]:.4f} ± {std:.4f}" if std else f"{m[key]:.4f}"


# ---------------------------------------------------------------- one function per JSON shape: JSON -> rows


def _quality_parts(r: dict) -> tuple[int, str, dict, dict, str, Row]:
    """A quality JSON's k, metric key, trustrec models, peers, a seeds label and the row of every model's figure."""
    k, models = r["k"], r["models"]
    key, ranked = f"ndcg@{k}", sorted(models, key=lambda m: -models[m][f"ndcg@{k}"])
    ours = {m: v for m, v in models.items() if m.startswith("trustrec")}
    peers = {m: v for m, v in models.items() if not m.startswith("trustrec")}
    every = (f"every model's test NDCG@{k} ({r['protocol']})", ", ".join(f"{m} {models[m][key]:.4f}" for m in ranked), met(None))
    return k, key, ours, peers, f"seed{'s' if len(r['seeds']) > 1 else ''} {','.join(map(str, r['seeds']))}", every


def quality_rows(r: dict) -> list[Row]:
    k, key, ours, peers, seeds, every = _quality_parts(r)
    rows = []
    if "trustrec-two-tower" in ours:
        tt = ours["trustrec-two-tower"][key]
        rows.append((f"two-tower NDCG@{k} ≥ 0.40", f"{pm(ours['trustrec-two-tower'], key)} ({seeds})", met(tt >= 0.40)))
    if ours:
        best = max(ours, key=lambda m: ours[m][key])
        rows.append((f"NDCG@{k} ≥ 0.50", f"{best} {pm(ours[best], key)} ({seeds})", met(ours[best][key] >= 0.50)))
        if peers:
            peer = max(peers, key=lambda m: peers[m][key])
            rows.append((f"NDCG@{k} above every peer", f"{best} {ours[best][key]:.4f} vs {peer} {peers[peer][key]:.4f}", met(ours[best][key] > peers[peer][key])))
    return [*rows, every]


def quality_other_rows(r: dict, within: float | None = None) -> list[Row]:
    """A dataset the recipes were not tuned on: the best trustrec model against the best peer
    (above it; or, with `within`, at most that share below it), and every model's figure."""
    k, key, ours, peers, seeds, every = _quality_parts(r)
    if not (ours and peers):
        return [every]
    best, peer = max(ours, key=lambda m: ours[m][key]), max(peers, key=lambda m: peers[m][key])
    gap = ours[best][key] / peers[peer][key] - 1
    goal = f"best trustrec NDCG@{k} above every peer" if within is None else f"best trustrec NDCG@{k} within {within:.0%} of the best peer or above"
    ok = ours[best][key] > peers[peer][key] if within is None else gap >= -within
    return [(goal, f"{best} {pm(ours[best], key)} vs {peer} {pm(peers[peer], key)} ({gap:+.1%}; {seeds})", met(ok)), every]


def side_signals_rows(r: dict) -> list[Row]:
    """benchmarks/side_signals.py: each family added to EASE, chosen on validation (test for information)."""
    res, k = r["results"], r["k"]
    parts = [f"{f} {v['val_ndcg']:.4f} / {v['test_ndcg']:.4f}" for f, v in res.items() if "val_ndcg" in v]
    above = ", ".join(r["above_ease_on_validation"]) or "none"
    return [(f"reference: EASE plus one side signal, validation / test NDCG@{k}", f"{'; '.join(parts)} (above EASE on validation: {above})", met(None))]


def peers_rows(r: dict) -> list[Row]:
    key = f"ndcg@{r['k']}"
    ranked = sorted(r["peers"].items(), key=lambda kv: -kv[1][key])
    fast = " (--fast settings)" if r.get("fast") else ""
    return [(f"reference: peers tuned on validation, refit on train + val, test NDCG@{r['k']}{fast}", ", ".join(f"{n} {p[key]:.4f}" for n, p in ranked), met(None))]


def time_to_target_rows(r: dict) -> list[Row]:
    goal = f"test NDCG@10 ≥ {r['target']:g} within {TIME_TO_TARGET_S:g} s of training ({r['stage']} stage, {r['threads']} threads)"
    if not r["reached"]:
        return [(goal, f"not reached; best {r['best_test']:.4f}", met(False))]
    return [(goal, f"epoch {r['epoch']} after {r['seconds']:.1f} s of training; best {r['best_test']:.4f}", met(r["seconds"] <= TIME_TO_TARGET_S))]


def privacy_rows(r: dict, quality: dict | None = None) -> list[Row]:
    """benchmarks/privacy.py: one row per goal (`<model>_eps_<e>_ratio | _above_popularity | _audit_auc`).
    A ratio is judged against the run's own non-private reference and, where the dataset's quality record
    holds a better trustrec model (the goal says "the best non-private trustrec model"), against that one
    too: the stricter of the two decides (the quality record's split differs: its figure is only the bar)."""
    k, rows = r["k"], []
    by = {(x["model"], x["epsilon"]): x for x in r["rows"]}
    ref = r.get("non_private_reference") or {}
    ours = {m: v[f"ndcg@{k}"] for m, v in (quality or {}).get("models", {}).items() if m.startswith("trustrec")}
    best = max(ours, key=ours.get) if ours else None
    for key, g in r["goals"].items():
        model, _, rest = key.partition("_eps_")
        eps_text, _, kind = rest.partition("_")
        x = by.get((model, float(eps_text)), {})
        ndcg = f"{x.get(f'ndcg@{k}', float('nan')):.4f} ± {x.get(f'ndcg@{k}_std', float('nan')):.4f}"
        ok = g["met"]
        if kind == "ratio":
            label, text = f"{model} NDCG@{k} ≥ {pct(g['goal'])} of the best non-private model at ε = {eps_text}", f"{pct(g['value'], 1)} ({ndcg})"
            if ref:
                text += f" of {ref['model']} {ref[f'ndcg@{k}']:.4f}"
            if best is not None and ours[best] > ref.get(f"ndcg@{k}", 0.0) and f"ndcg@{k}" in x:
                stricter = x[f"ndcg@{k}"] / ours[best]
                text += f"; {pct(stricter, 1)} of {best} {ours[best]:.4f} (the quality record, its own split)"
                ok = ok and stricter >= g["goal"]
        elif kind == "above_popularity":
            label, text = f"{model} NDCG@{k} above popularity at ε = {eps_text}", f"{ndcg} vs {g['goal']:.4f}"
        else:
            label, text = f"{model} membership-inference audit ROC AUC ≤ {g['goal']:g} at ε = {eps_text}", f"{g['value']:.3f} (worse of the two attacks)"
        rows.append((label, text, met(ok)))
    return rows or [("privacy goals", "none measured in this run", "not measured")]


def dp_ease_rows(r: dict) -> list[Row]:
    key = f"ndcg@{r['k']}"
    base = next((x["val_tuned"][key] for x in r["results"] if math.isinf(x["epsilon"])), None)
    rows = []
    for x in r["results"]:
        if math.isinf(x["epsilon"]) or "fixed" not in x:
            continue
        eps, fixed = x["epsilon"], x["fixed"]
        goal = PRIVACY_SHARE_GOALS.get(eps)
        text = f"fixed λ (fully DP) {pm(fixed, key)}, validation-tuned {pm(x['val_tuned'], key)}; noise seeds {','.join(map(str, x['noise_seeds']))}"
        if base:
            text += f"; fixed = {pct(fixed[key] / base, 1)} of its ε = ∞ row ({base:.4f})"
        label = f"DP-EASE NDCG@{r['k']} ≥ {pct(goal)} of non-private at ε = {eps:g}" if goal else f"DP-EASE NDCG@{r['k']} at ε = {eps:g}"
        rows.append((label, text, met(fixed[key] / base >= goal if goal and base else None)))
    return rows or [("DP-EASE", "no finite ε in this run", "not measured")]


def federated_rows(r: dict) -> list[Row]:
    c, rows = r["centralized"], []
    for name, f in r["federated"].items():
        text = f"{pct(f['ratio_test_ndcg'], 1)} of centralized ({f['test_ndcg']:.4f} vs {c['test_ndcg']:.4f}), {f['steps_run']} rounds run"
        if "rounds_to_95pct_val" in f:  # silos: how soon validation got within 95 % of central
            r95 = f["rounds_to_95pct_val"]
            text += f", 95 % of central validation {'at round ' + str(r95) if r95 else 'not reached'}"
        else:  # cross-device (benchmarks/federated.py --data ml1m-implicit): clients per round and the DP spend
            text += f", {f['clients_per_round_mean']:.0f} clients a round"
            eps = (f.get("privacy") or {}).get("epsilon")
            text += f", ε {eps:.2f}" if eps is not None else ""
        if f.get("ratio_to_centralized"):  # federated EASE: also against its centralized twin and the best centralized model
            text += "; " + ", ".join(f"{pct(v, 1)} of centralized {m}" for m, v in f["ratio_to_centralized"].items())
        dp = name in ("dp", "gram_dp") and "rounds_to_95pct_val" not in f
        rows.append((f"{name}: {r['goal']}", text, met(None if dp else f["goal_met"])))
    return rows


def cold_start_rows(r: dict) -> list[Row]:
    rows, k = [], r["k"]
    for key, g in r["goals"].items():
        if key == "item_ratio_vs_content":
            item = r["results"]["item_cold_start"]
            rows.append((f"item cold start: hybrid NDCG@{k} ≥ {g['goal']:g}× content-only", f"{g['value']:.2f}× ({item[f'hybrid/ndcg@{k}']:.4f} vs {item[f'content/ndcg@{k}']:.4f})", met(g["met"])))
        elif key == "user_genre_match":
            first = r["results"].get("user_cold_start", {}).get("hybrid_stated_first/genre_match")
            rule = f"; serving's stated-genres-first rule: {first:.3f}" if first is not None else ""
            rows.append((f"user cold start: ≥ {g['goal']:g} of the top {k} in a stated genre (the model alone)", f"{g['value']:.3f}{rule}", met(g["met"])))
        else:
            rows.append((key, f"{g['value']}", met(g["met"])))
    return rows


def consent_rows(r: dict) -> list[Row]:
    c = r["consent_change_to_changed_answer_ms"]
    text = f"p95 {c['p95']:.1f} ms, p50 {c['p50']:.1f} ms over {r['flips']} flips; {pct(r['changed_on_the_very_next_request'])} changed on the very next request"
    return [(f"consent change → changed answer: p95 < {r['goal_ms']:g} ms", text, met(r["meets_goal_p95"]))]


def serve_load_rows(r: dict) -> list[Row]:
    rows, div = [], lambda d: "MMR off" if d in (None, "none") else f"MMR {d}"  # noqa: E731
    for key, g in r["goals"].items():
        status = met(g["met"]) if g.get("measured", True) else "not measured"
        if key == "p99_at_300rps":
            text = "; ".join(f"{div(d)}: " + ", ".join(f"{x['p99_ms']:.1f} ms at {x['rps']:g}/s" + (f" ({x['errors']} errors)" if x["errors"] else "") for x in v["rows"])
                             for d, v in g["per_diversity"].items())  # fmt: skip
        elif key == "p99_vs_noop":
            ratios = [x["p99_over_noop"] for x in g["rows"] if x["p99_over_noop"] is not None]
            text = f"{min(ratios):.2f}–{max(ratios):.2f}× over {len(ratios)} (diversity, rate) pairs" if ratios else "no comparable rate"
        elif key == "median_overhead_vs_in_process":
            diffs = [x["p50_minus_in_process_ms"] for x in g["rows"] if x["p50_minus_in_process_ms"] is not None]
            text = f"{min(diffs):+.2f} to {max(diffs):+.2f} ms over {len(diffs)} (diversity, rate) pairs" if diffs else "no rate measured"
        elif key == "overload_sheds_fast" and r.get("overload"):
            o = r["overload"]
            shed = f"{pct(o['shed_share'], 1)} shed as 503 (503 p99 {o['p99_503_ms']:.1f} ms)" if o["shed_503"] else "none shed"
            ok = f"200 p99 {o['p99_200_ms']:.1f} ms" if o["p99_200_ms"] is not None else "no 200"
            text = f"{o['rate_rps']:g}/s: {shed}, {ok}, {o['timeouts']} timeouts, {o['other_errors']} other errors"
        else:
            text = "see the JSON"
        rows.append((g.get("goal", key), text, status))
    return rows


def serve_faults_rows(r: dict) -> list[Row]:
    g, x = r["goals"], r["result"]
    kills = len(x["kills"])
    return [
        (f"failed requests ≤ {g['failed_pct_max']:g} % while a replica is killed", f"{x['failed_pct']:.2f} % ({x['failed']} of {x['requests']} at {x['rate_rps']:g}/s, {kills} kills, {r.get('ingress', '?')} ingress)",
         met(x["failed_pct"] <= g["failed_pct_max"])),
        (f"recovery ≤ {g['recovery_s_max']:g} s", f"max {x['max_recovery_s']:.2f} s over {kills} kills", met(x["max_recovery_s"] is not None and x["max_recovery_s"] <= g["recovery_s_max"])),
    ]  # fmt: skip


def fuzz_rows(r: dict) -> list[Row]:
    g = r["goal"]
    groups = ", ".join(f"{name} {sum(r['failures'].get(c, 0) for c in checks)}" for name, checks in g["groups"].items())
    text = f"{r['total_cases']:,} cases; {groups}; {r['lost_requests']} lost requests, {r['check_errors']} check errors"
    return [(f"≥ {g['min_cases']:,} schemathesis cases with 0 server errors, schema violations, auth mismatches and protocol failures; none lost", text, met(g["met"]))]


def train_throughput_rows(r: dict) -> list[Row]:
    d = r["data"]
    data = f"shards {d['shards']}" if "shards" in d else f"synthetic {d['users']:,} users × {d['items']:,} items × {d['per_user']:g}/user"
    return [(f"training throughput, {x['mode']} ({x['world_size']} rank{'s' if x['world_size'] > 1 else ''}; {data}, batch {r['batch_size']})",
             f"{x['seconds_per_epoch']:.2f} s/epoch, {x['users_per_s']:,.0f} users/s, {x['interactions_per_s']:,.0f} interactions/s on {x['device']}", met(None))
            for x in r["rows"]]  # fmt: skip


def ann_rows(r: dict) -> list[Row]:
    g, c, k = r["goal"], r["catalog"], r["catalog"]["k"]
    param = next(p for p in ("nprobe", "ef_search") if p in g)
    text = f"{g['index']} {param} {g[param]}: recall@{k} {g[f'recall@{k}']:.3f}, p95 {g['p95_ms_1_thread']} ms, p50 {g['p50_ms_1_thread']} ms (1 thread, batch 1), {c['items']:,} items × {c['dim']}"
    return [(f"top-{k}: p95 ≤ {g['latency_goal_ms']:g} ms/query and recall@{k} ≥ {g['recall_goal']:g}", text, met(g["met"]))]


# ---------------------------------------------------------------- the areas


@dataclass
class Source:
    name: str  # docs/results/<name>.json
    command: str  # what makes it the figure of record
    goal: str  # what it measures, shown while it is absent
    rows: Callable[[dict], list[Row]]
    label: str = ""  # prefixed to its goals where an area has several sources of the same kind
    context: str = ""  # another record its rows also read (rows(report, that record or None))


AREAS: list[tuple[str, list[Source]]] = [
    ("Quality (MovieLens-100k, Microsoft Recommenders protocol)", [
        Source("quality_ml100k_stratified", "python benchmarks/quality.py --data ml100k --seeds 0,1,2 --record",
               "two-tower NDCG@10 ≥ 0.40; NDCG@10 ≥ 0.50 and above every peer", quality_rows),
        Source("peers_ml100k_stratified", "python benchmarks/peers.py --record", "reference: peers tuned on validation", peers_rows),
        Source("time_to_target_two_tower_ml100k_select", "python benchmarks/time_to_target.py --record",
               f"test NDCG@10 ≥ 0.45 within {TIME_TO_TARGET_S:g} s of training on 2 cores", time_to_target_rows),
        Source("side_signals_ml100k", "python benchmarks/side_signals.py --data ml100k --record",
               "reference: rating times, genres, demographics added to EASE (toward 0.50)", side_signals_rows),
    ]),
    ("Quality on datasets the recipes were not tuned on (configs/two_tower_ease.yaml and the generic configs)", [
        Source("quality_ml1m-implicit_given", "python benchmarks/quality.py --data ml1m-implicit --seeds 0,1,2 --record",
               "best trustrec model above every peer", quality_other_rows, "ML-1M implicit"),
        Source("quality_synthetic_stratified", "python benchmarks/quality.py --data synthetic --seeds 0,1,2 --record",
               "best trustrec model above every peer", quality_other_rows, "synthetic"),
        Source("side_signals_synthetic", "python benchmarks/side_signals.py --data synthetic --config configs/two_tower_ease.yaml --record",
               "reference: rating times, genres, demographics added to EASE", side_signals_rows, "synthetic"),
        Source("quality_ml100k-generic_stratified", "python benchmarks/quality.py --data ml100k --recipes generic --seeds 0,1,2 --record",
               "best trustrec model within 1 % of the best peer or above", lambda r: quality_other_rows(r, within=0.01), "ML-100k, generic recipes"),
    ]),
    ("Privacy (user-level DP, membership-inference audit)", [
        Source("privacy_ml1m-implicit", "python benchmarks/privacy.py --data ml1m-implicit --record",
               "ML-1M implicit: NDCG@10 ≥ 90 % of the best non-private trustrec model at ε = 8, ≥ 70 % at ε = 1; above popularity; audit AUC ≤ 0.55 at ε ≤ 8", privacy_rows,
               context="quality_ml1m-implicit_given"),
        Source("privacy_ml100k", "python benchmarks/privacy.py --data ml100k --record",
               "ML-100k: above popularity at ε ≥ 1; audit AUC ≤ 0.55 at ε ≤ 8 (ratios for information)", privacy_rows,
               context="quality_ml100k_stratified"),
        Source("dp_ease", "python benchmarks/dp_ease.py --data ml100k --record", "DP-EASE against the same shares of non-private NDCG@10", dp_ease_rows),
    ]),
    ("Federated (Flower vs centralized)", [
        Source("federated_ml100k", "python benchmarks/federated.py --record",
               "federated test NDCG@10 ≥ 95 % of centralized within ≤ 100 rounds", federated_rows),
        Source("federated_ml1m-implicit", "python benchmarks/federated.py --data ml1m-implicit --record",
               "cross-device, 6,040 one-user clients: ≥ 90 % of centralized without DP; the DP figure at ε 8", federated_rows, "ML-1M implicit"),
    ]),
    ("Cold start", [
        Source("cold_start_ml100k", "python benchmarks/cold_start.py --data ml100k --config configs/hybrid_ml100k.yaml --record",
               "item cold start: hybrid ≥ 1.5× content-only; user cold start: genre match ≥ 0.8", cold_start_rows, "ML-100k"),
        Source("cold_start_synthetic", "python benchmarks/cold_start.py --data synthetic --record",
               "item cold start: hybrid ≥ 1.5× content-only; user cold start: genre match ≥ 0.8", cold_start_rows, "synthetic"),
    ]),
    ("Consent", [
        Source("consent_latency", "python benchmarks/consent_latency.py --record", "consent change → changed answer: p95 < 1 s", consent_rows),
    ]),
    ("Serving load (open-loop HTTP)", [
        Source("serve_load", "python benchmarks/serve_load.py --overload --record",
               "p99 ≤ 20 ms with 0 errors at ≥ 300 rps; p99 ≤ 1.5× the no-op app's; p50 ≤ in-process + 3 ms; overload sheds fast", serve_load_rows),
    ]),
    ("Faults (replica killed under load)", [
        Source("serve_faults", "python benchmarks/serve_faults.py --record",
               "≤ 1 % failed requests, recovery ≤ 10 s", serve_faults_rows),
    ]),
    ("Fuzz (schemathesis against the live app)", [
        Source("fuzz", "python benchmarks/fuzz.py --record", "≥ 10,000 cases; 0 server errors, schema violations, auth mismatches, protocol failures", fuzz_rows),
    ]),
    ("Training throughput", [
        Source("train_throughput", "python benchmarks/train_throughput.py --users 10000 --items 3000 --epochs 3 --threads 1 --record",
               "seconds per epoch and users/s per mode (reported, no numeric goal)", train_throughput_rows),
    ]),
    ("ANN retrieval", [
        Source("ann", "python benchmarks/ann.py --record", "top-100 on 1M items: p95 ≤ 2 ms/query, recall@100 ≥ 0.95", ann_rows),
    ]),
]  # fmt: skip


# ---------------------------------------------------------------- rendering


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def when(report: dict) -> str:
    stamp = report.get("date") or report.get("at")
    return stamp.replace("T", " ").replace("Z", " UTC") if stamp else "not recorded"


def render_area(title: str, sources: list[Source], records: dict[str, dict]) -> str:
    lines = [f"## {title}", "", "| goal | current figure | status | command | date | machine |", "|---|---|---|---|---|---|"]
    for s in sources:
        prefix = f"{s.label}: " if s.label else ""
        report = records.get(s.name)
        if report is None:
            lines.append(f"| {cell(prefix + s.goal)} | no figure of record yet (docs/results/{s.name}.json) | not measured | `{cell(s.command)}` | – | – |")
            continue
        for i, (goal, figure, status) in enumerate(s.rows(report, records.get(s.context)) if s.context else s.rows(report)):
            where = f"`{cell(report.get('command', 'not recorded').strip())}` | {when(report)} | {cell(harness.describe(report.get('machine')))}" if i == 0 else "〃 | 〃 | 〃"
            lines.append(f"| {cell(prefix + goal)} | {cell(figure)} | {status} | {where} |")
    return "\n".join(lines)


HEAD = """# Results

<!-- generated by `python benchmarks/results_page.py` from docs/results/*.json: edit those, not this page -->

The current figure for every goal, one table per area. Each row comes from a JSON of record in
[`docs/results/`](results/) (a benchmark run with `--record` writes it, with the command, the date and
the machine) and this page is generated from them by `python benchmarks/results_page.py`; a test fails
when the two disagree. How each figure came about, and every earlier one: [BENCHMARKS.md](BENCHMARKS.md),
the lab notebook. Timings depend on the machine and its load; quality figures are deterministic for
a given command. Status: met, **not met**, reported (no goal), or not measured (no JSON of record yet:
the row names the command that makes it). 〃: as the row above."""


def render(records: dict[str, dict]) -> str:
    known = {s.name for _, sources in AREAS for s in sources}
    body = [render_area(title, sources, records) for title, sources in AREAS]
    extra = sorted(set(records) - known)
    tail = ["", f"Not shown (no area reads them): {', '.join(f'docs/results/{n}.json' for n in extra)}."] if extra else []
    return HEAD + "\n\n" + "\n\n".join(body) + "\n" + "\n".join(tail) + ("\n" if tail else "")


def load(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--records", default=str(harness.RECORD), help="folder of the JSON of record (default docs/results)")
    p.add_argument("--out", default=str(PAGE), help="the page (default docs/RESULTS.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page differs from what the JSON gives")
    args = p.parse_args(argv)
    page = render(load(Path(args.records)))
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == page
        print(f"{out}: {'up to date' if same else 'differs from ' + args.records + ': run python benchmarks/results_page.py'}", file=sys.stderr)
        return 0 if same else 1
    out.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
