"""`trustrec experiment report NAME`: the experiment's exposure log and outcomes (the feature
store's `exposures` / `outcomes`, features/exposures.py) turned into per-arm figures, lifts against
control, the sample-ratio-mismatch test and guardrails (training/experiments/stats.py), an HTML page
with plots, and an MLflow run holding all of it.

The analysis is intent-to-treat by the ASSIGNED arm: a user without personalization consent who was
assigned a personalized arm (and served the fallback) stays in that arm, as the assignment put them
there; each arm says how many of its exposures were served the fallback. Holdout users are outside
every arm but count in the SRM test with the holdout's share. A click is a `click` outcome of value 1
(several clicks on one position count once). Erased users' rows are gone from the store, so they
have left the analysis too.
"""
from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from features.experiments import HOLDOUT, ExperimentConfig
from training.experiments.stats import report as arm_report

log = logging.getLogger(__name__)


def gather(store, cfg: ExperimentConfig) -> dict[str, Any]:
    """The arrays stats.report needs, from the store's logs of experiment `cfg.name`."""
    from features.exposures import exposures, outcomes
    from features.store import items_table, popularity_table
    from sqlalchemy import select

    rows = exposures(store, cfg.name)
    clicked: dict[str, set] = {}
    for o in outcomes(store, cfg.name):
        if o["kind"] == "click" and o["value"] >= 1:
            clicked.setdefault(o["exposure_id"], set()).add(o["position"] if o["position"] is not None else -1)
    with store.snapshot() as conn:
        pop = dict(conn.execute(select(popularity_table.c.item_id, popularity_table.c["count"])).all())
        genres_of = dict(conn.execute(select(items_table.c.item_id, items_table.c.genres)).all())
    catalog = sorted(pop)
    names = store.genre_names()
    column = {g: j for j, g in enumerate(names)}
    multi_hot = np.zeros((len(catalog), max(len(names), 1)), np.float64)  # genre diversity of the shown lists
    for i, item in enumerate(catalog):
        for g in (genres_of.get(item) or "").split("|"):
            if g in column:
                multi_hot[i, column[g]] = 1.0
    index = {item: i for i, item in enumerate(catalog)}
    assigned: dict[str, set] = {}
    for r in rows:
        assigned.setdefault(r["arm"], set()).add(r["subject"])
    inside = [r for r in rows if r["arm"] != HOLDOUT]
    k = max((len(r["items"]) for r in inside), default=0)
    lists = np.full((len(inside), k), -1, np.int64)
    for n, r in enumerate(inside):
        for j, entry in enumerate(r["items"]):
            lists[n, j] = index.get(entry[0], -1)
    return {
        "users": [r["subject"] for r in inside],
        "arms": [r["arm"] for r in inside],
        "shown": np.array([len(r["items"]) for r in inside], np.float64),
        "clicks": np.array([len(clicked.get(r["exposure_id"], ())) for r in inside], np.float64),
        "fallback": {a.name: sum(1 for r in inside if r["arm"] == a.name and r["served"] != a.name) for a in cfg.arms},
        "assigned": {name: len(users) for name, users in assigned.items()},
        "lists": lists,
        "n_items": len(catalog),
        "item_pop": np.array([pop[i] for i in catalog], np.float64),
        "item_genres": multi_hot if names else None,
        "holdout_exposures": len(rows) - len(inside),
    }


def analyse(store, cfg: ExperimentConfig) -> dict[str, Any]:
    """The report's JSON: per arm figures, lifts, SRM, guardrails, fallback counts."""
    g = gather(store, cfg)
    if not g["users"]:
        raise ValueError(f"experiment {cfg.name!r}: no exposure logged yet in this store")
    weights = {a.name: a.weight * (1 - cfg.holdout) / sum(x.weight for x in cfg.arms) for a in cfg.arms}
    counts = {a.name: g["assigned"].get(a.name, 0) for a in cfg.arms}
    if cfg.holdout:
        weights[HOLDOUT], counts[HOLDOUT] = cfg.holdout, g["assigned"].get(HOLDOUT, 0)
    body = arm_report(g["users"], g["arms"], g["shown"], g["clicks"], control=cfg.control_arm.name,
                      weights={a.name: a.weight for a in cfg.arms}, lists=g["lists"],
                      n_items=max(g["n_items"], 1), item_pop=g["item_pop"], item_genres_multi_hot=g["item_genres"])  # fmt: skip
    from training.experiments.stats import srm

    body["srm"] = srm(counts, weights).to_dict()  # every assigned user, the holdout included
    for name, n in g["fallback"].items():
        body["arms"][name]["served_fallback_exposures"] = n
    body.update({"experiment": cfg.name, "holdout_exposures": g["holdout_exposures"], "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return body


# --------------------------------------------------------------------------- plots and page


def plot_arms(path: Path, body: dict[str, Any], metric: str = "ctr") -> None:
    """Per arm: the metric with its 95 % CI (left); lift vs control with its CI (right)."""
    from training.report import _figure

    arms = list(body["arms"])
    fig = _figure(10, 3.6)
    left, right = fig.subplots(1, 2)
    vals = [body["arms"][a].get(metric) for a in arms]
    x = np.arange(len(arms))
    for i, v in enumerate(vals):
        if v:
            left.errorbar(i, v["value"], yerr=[[v["value"] - v["low"]], [v["high"] - v["value"]]], fmt="o", capsize=6,
                          color="tab:grey" if arms[i] == body["control"] else "tab:blue")  # fmt: skip
    left.set_xticks(x, arms)
    left.set_title(f"{metric} per arm (95 % CI)")
    left.grid(alpha=0.3)
    treated = [a for a in arms if a != body["control"] and metric in body["arms"][a].get("lift", {})]
    for i, a in enumerate(treated):
        rel = body["arms"][a]["lift"][metric]["relative"]
        right.errorbar(i, 100 * rel["value"], yerr=[[100 * (rel["value"] - rel["low"])], [100 * (rel["high"] - rel["value"])]], fmt="o", capsize=6)
    right.axhline(0, color="black", linewidth=1)
    right.set_xticks(np.arange(len(treated)), treated)
    right.set_title(f"relative lift of {metric} vs {body['control']} (%, 95 % CI)")
    right.grid(alpha=0.3)
    fig.savefig(path)


def _fmt_interval(v: dict | None, pct: bool = False) -> str:
    if not v:
        return "–"
    f = (lambda x: f"{100 * x:+.2f} %") if pct else (lambda x: f"{x:.4f}")
    return f"{f(v['value'])} [{f(v['low'])}, {f(v['high'])}]"


def render_html(body: dict[str, Any], plot_name: str) -> str:
    esc = html.escape
    srm_row = body["srm"]
    rows = []
    for name, a in body["arms"].items():
        lift = a.get("lift", {}).get("ctr", {})
        guard = a.get("guardrails", {})
        rows.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
            name + (" (control)" if name == body["control"] else ""), a["users"], a["exposures"], a.get("served_fallback_exposures", 0),
            _fmt_interval(a.get("ctr")), _fmt_interval(a.get("conversion")),
            _fmt_interval(lift.get("absolute")), _fmt_interval(lift.get("relative"), pct=True),
            ", ".join(f"{k} {v:.3f}" for k, v in guard.items()),
        )) + "</tr>")  # fmt: skip
    verdict = "MISMATCH: the split is broken, do not read the lifts" if srm_row["mismatch"] else "no mismatch"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>experiment {esc(body['experiment'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
.bad{{color:#b00;font-weight:bold}}</style></head><body>
<h1>Experiment {esc(body['experiment'])}</h1>
<p>Generated {esc(body['generated_at'])}. Intent-to-treat by assigned arm; 95 % confidence intervals ({esc(body['method'])}).
Holdout exposures: {body['holdout_exposures']}.</p>
<p class="{'bad' if srm_row['mismatch'] else ''}">Sample ratio: χ² = {srm_row['chi2']:.2f}, p = {srm_row['p_value']:.3g} — {verdict}.</p>
<table><tr><th>arm</th><th>users</th><th>exposures</th><th>served fallback (no consent)</th><th>CTR</th><th>conversion</th>
<th>CTR lift (abs)</th><th>CTR lift (rel)</th><th>guardrails</th></tr>{''.join(rows)}</table>
<p><img src="{esc(plot_name)}" alt="CTR per arm and lift vs control" style="max-width:100%"></p>
</body></html>"""


def build(store, cfg: ExperimentConfig, out_dir: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Write report.json, arms.png and report.html to `out_dir`; log them and the headline figures to
    an MLflow run (experiment `trustrec-experiments`, run name `report:<name>`) when `tracking_uri`."""
    body = analyse(store, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(body, indent=2))
    plot_arms(out_dir / "arms.png", body)
    (out_dir / "report.html").write_text(render_html(body, "arms.png"))
    if tracking_uri:
        import mlflow

        client_uri = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(tracking_uri)
        try:
            mlflow.set_experiment("trustrec-experiments")
            with mlflow.start_run(run_name=f"report:{cfg.name}") as run:
                mlflow.set_tags({"experiment": cfg.name, "control": body["control"], "srm_mismatch": str(body["srm"]["mismatch"]).lower()})
                metrics = {"srm/p_value": body["srm"]["p_value"]}
                for name, a in body["arms"].items():
                    if a.get("ctr"):
                        metrics[f"{name}/ctr"] = a["ctr"]["value"]
                    for kind, v in a.get("lift", {}).get("ctr", {}).items():
                        metrics[f"{name}/ctr_lift_{kind}"] = v["value"]
                mlflow.log_metrics(metrics)
                mlflow.log_artifacts(str(out_dir), "experiment_report")
                body["mlflow_run_id"] = run.info.run_id
        finally:
            mlflow.set_tracking_uri(client_uri)
        (out_dir / "report.json").write_text(json.dumps(body, indent=2))  # with the run that holds it
    return body
