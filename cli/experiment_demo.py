"""`trustrec experiment demo` / `make experiment-demo`: a controlled experiment end to end, on a
simulated population whose true preferences are known (features/click_sim.py).

1. Train two models on the synthetic data: `champion` and a `challenger` (linear towers), both
   registered in one MLflow registry.
2. Serve an experiment with three arms — `popularity` (control, no user data), `champion` (with
   exploration: its logs can evaluate other models) and `challenger` — through Ray Serve on 127.0.0.1.
3. Drive it over HTTP: each simulated user asks for recommendations, clicks as the position-based
   click model says, and the clicks come back through POST /v1/events with the list's exposure_id.
4. `trustrec experiment report`: per-arm CTR with 95 % CIs, lifts vs popularity, SRM, guardrails.
5. Off-policy evaluation of the challenger on the champion arm's exposures alone, against the
   challenger's own online CTR and the simulator's exact CTR of its lists.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import numpy as np
import requests
import yaml

from training.config import load_config
from training.pipeline import train

CONFIG = "configs/two_tower.yaml"
SERVE_CONFIG = "configs/serve.yaml"


def _arms() -> list[dict]:
    return [
        {"name": "popularity", "baseline": "popularity"},
        # epsilon 0.3 over a pool of 30: SNIPS / DR within ~7 % of the truth at 50k lists (benchmarks/ope.py)
        {"name": "champion", "model": "champion", "epsilon": 0.3, "pool": 30},
        {"name": "challenger", "model": "challenger"},
    ]


def run_experiment_demo(root: Path, users: int = 600, rounds: int = 2, epochs: int = 15, k: int = 10, seed: int = 0) -> dict:
    from features.click_sim import Population
    from features.experiments import ExperimentConfig
    from features.store import FeatureStore
    from serving.ingress import free_port
    from serving.launch import start, stop
    from training.experiments.report import build

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("TRUSTREC_EXPERIMENT_KEY", "TRUSTREC_ADMIN_TOKEN", "TRUSTREC_TOKEN_SECRET", "TRUSTREC_ERASURE_SALT"):
        os.environ.setdefault(name, secrets.token_hex(24))  # a demo's own secrets, set before Ray starts its workers
    tracking, store_url = f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'features.db'}"
    common = [f"tracking.tracking_uri={tracking}", f"store.url={store_url}", f"trainer.epochs={epochs}", "trainer.progress=false",
              f"trainer.checkpoint_dir={root / 'checkpoints'}", "tracking.experiment=trustrec-experiment-demo"]  # fmt: skip
    cfg = load_config(CONFIG, common + [f"export.output_dir={root / 'champion'}"])
    champion = train(cfg)
    challenger = train(load_config(CONFIG, common + [f"export.output_dir={root / 'challenger'}", "model.hidden_layers=0", "tracking.alias=challenger",
                                                     "store.load=false", "trainer.checkpoint_dir=" + str(root / "checkpoints-challenger")]))  # fmt: skip
    print(f"trained: champion v{champion.model_version} (test NDCG@10 {champion.metrics['test/ndcg_at_10']:.3f}), "
          f"challenger v{challenger.model_version} ({challenger.metrics['test/ndcg_at_10']:.3f})")  # fmt: skip

    experiment = {"name": "demo", "arms": _arms()}
    serve = yaml.safe_load(Path(SERVE_CONFIG).read_text())
    serve["http_options"]["port"] = free_port()
    serve["applications"][0]["args"].update(tracking_uri=tracking, store_url=store_url, experiment=experiment)
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(serve))

    population = Population(cfg.data.synthetic)
    rng = np.random.default_rng(seed)
    admin = {"Authorization": f"Bearer {os.environ['TRUSTREC_ADMIN_TOKEN']}"}
    # the challenger's own list for each champion-arm request, made from the same store state just
    # before the request (the user's clicks then change the state): what off-policy evaluation compares
    from serving.recommender import Recommender

    local_store = FeatureStore(store_url)
    challenger_local = Recommender.from_dir(root / "challenger", store=local_store)
    champion_local = Recommender.from_dir(root / "champion", store=local_store)  # its top-`pool`: what the log can show at all
    pool = next(a["pool"] for a in _arms() if a["name"] == "champion")
    targets: dict[str, list[str]] = {}
    in_pool: list[float] = []
    url = start(path, ingress="haproxy")
    served = clicks = 0
    try:
        with requests.Session() as http:
            for _ in range(rounds):
                for uid in (f"u{i}" for i in range(1, users + 1)):
                    would = [it["item_id"] for it in challenger_local.recommend(uid, k)["items"]]
                    answer = http.post(f"{url}/v1/recommend", json={"user_id": uid, "k": k}, timeout=30)
                    answer.raise_for_status()
                    body = answer.json()
                    shown = [it["item_id"] for it in body["items"]]
                    if body["arm"] == "champion":
                        targets[body["exposure_id"]] = would
                        reachable = {it["item_id"] for it in champion_local.recommend(uid, pool)["items"]}
                        in_pool.append(sum(i in reachable for i in would) / max(len(would), 1))
                    served += 1
                    for item, clicked in zip(shown, population.clicks_for(uid, shown, rng)):
                        if clicked:
                            event = {"user_id": uid, "item_id": item, "exposure_id": body["exposure_id"]}
                            http.post(f"{url}/v1/events", json=event, headers=admin, timeout=30).raise_for_status()
                            clicks += 1
    finally:
        stop()  # the replicas write the exposures still queued as they shut down
        local_store.close()
    print(f"served {served} lists to {users} simulated users, {clicks} clicks sent back through /v1/events")

    exp_cfg = ExperimentConfig.model_validate(experiment)
    with FeatureStore(store_url) as store:
        report = build(store, exp_cfg, root / "report", tracking)
        ope = _ope(store, targets, population, k)
        if ope and in_pool:
            ope["support"] = float(np.mean(in_pool))  # share of the challenger's items the champion arm could have shown
    _print(report, ope)
    print(f"\nreport: {root / 'report' / 'report.html'}; MLflow run {report['mlflow_run_id']} ({tracking}). "
          f"Demo took {time.monotonic() - started:.0f} s.")  # fmt: skip
    return {"report": report, "ope": ope, "served": served, "clicks": clicks, "seconds": time.monotonic() - started}


def _ope(store, targets: dict[str, list[str]], population, k: int) -> dict:
    """The challenger evaluated on the champion arm's logged lists (its exploration makes that possible);
    `targets`: exposure id -> the challenger's list for that request."""
    from features.exposures import exposures, outcomes
    from training.experiments import ope

    rows = [e for e in exposures(store, "demo") if e["arm"] == e["served"] == "champion" and e["exposure_id"] in targets]
    if not rows:
        return {}
    clicked: dict[str, set] = {}
    for o in outcomes(store, "demo"):
        if o["kind"] == "click" and o["value"] >= 1 and o["position"] is not None:
            clicked.setdefault(o["exposure_id"], set()).add(o["position"])
    subjects = {store.subject_hash(u): u for u in population.user_vocab.ids}  # the demo knows its own simulated ids
    users = [subjects[e["subject"]] for e in rows]
    items = population.item_vocab
    logged = np.array([[items.index(i[0]) for i in e["items"][:k]] for e in rows])
    props = np.array([[i[2] for i in e["items"][:k]] for e in rows])
    clicks = np.array([[j in clicked.get(e["exposure_id"], ()) for j in range(k)] for e in rows], dtype=np.float64)
    target = np.array([[items.index(i) for i in targets[e["exposure_id"]][:k]] for e in rows])
    explored = np.array([e["explored"] for e in rows])
    try:  # a small demo can log too few lists (or explored ones) for an estimator: say so instead of failing
        est = ope.evaluate(logged, clicks, props, target, explored=explored if explored.sum() >= 2 else None, n_items=population.n_items)
    except ValueError as e:
        return {"lists": len(rows), "skipped": str(e)}
    est["truth_ctr"] = population.expected_ctr(population.user_vocab.encode(users), target)
    w = ope.weights(logged, props, target)
    est["matched_slots"] = int((w > 0).sum())  # (list, position) pairs where the log shows the target's item
    est["explored_clicks"] = int(((w > 1.0 / (1 - 0.3 + 0.3 / 30) + 1e-9) & (clicks > 0)).sum())  # clicked matches from the random branch
    return est


def _print(report: dict, ope: dict) -> None:
    srm = report["srm"]
    print(f"\nexperiment demo: control {report['control']}; SRM p = {srm['p_value']:.3g}" + ("  MISMATCH" if srm["mismatch"] else ""))
    for name, a in report["arms"].items():
        ctr, rel = a.get("ctr"), a.get("lift", {}).get("ctr", {}).get("relative")
        line = f"  {name:<11} users {a['users']:>4}  CTR {ctr['value']:.4f} [{ctr['low']:.4f}, {ctr['high']:.4f}]" if ctr else f"  {name}"
        if rel:
            line += f"  lift vs {report['control']} {100 * rel['value']:+.1f} % [{100 * rel['low']:+.1f}, {100 * rel['high']:+.1f}]"
        print(line)
    if ope.get("skipped"):
        print(f"\noff-policy: skipped, {ope['lists']} logged champion lists are too few ({ope['skipped']})")
    elif ope:
        online = report["arms"]["challenger"].get("ctr", {}).get("value")
        print(f"\noff-policy: the challenger's CTR from the champion arm's {ope['lists']} logged lists "
              f"(simulator truth {ope['truth_ctr']:.4f}; its own arm online {online:.4f}):")  # fmt: skip
        for name, e in ope["estimates"].items():
            print(f"  {name:<8} {e['ctr']:.4f} [{e['ctr_low']:.4f}, {e['ctr_high']:.4f}]  ({e['n']} lists)")
        print(f"  the log shows the challenger's item at its position in {ope['matched_slots']} slots; "
              f"{100 * ope['support']:.0f} % of the challenger's items lie in the champion's top 30 (the only ones its log can show)")
        print(f"  clicked slots the random branch put there: {ope['explored_clicks']}; each weighs ~100x, so with few of them the estimates "
              "read low and their normal CIs are not to be trusted; benchmarks/ope.py measures the estimators at 50k lists "
              "(within 7 % of the truth at full support)")  # fmt: skip
