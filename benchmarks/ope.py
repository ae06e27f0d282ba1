"""Off-policy evaluation and A/B statistics on the click simulator, against the exact truth.

    python benchmarks/ope.py                                  # eps 0.1,0.3,0.5 x pool 10,30,100; seeds 0-4; 50k lists
    python benchmarks/ope.py --epsilons 0.3 --pools 30 --seeds 0 --experiments 20

Simulator: features.click_sim.Population() (the synthetic default: 1000 users, 800 items), lists of
k = 10, position-based clicks with theta_j = 1/(j+1). Each exposure is a user drawn uniformly.

OPE. The logging model ranks by z + 0.7 e0 + 0.5 e1 (z: the true standardized utility, e: N(0, 1)
per (user, item), fixed) and serves bundle.policy.explore_slate(epsilon, pool N); each slot logs its
propensity. Two candidates, both better than the logging model and sharing its error e0 (a retrained
model inherits most of its predecessor's errors), scored z + 0.7 e0 + 0.2 e2:
  rerank       its top-10 of the logging model's top-30 (a re-ranker of the champion's candidates):
               inside the exploration pool whenever N >= 30;
  independent  its top-10 of the whole catalogue: some of its items are outside any pool (support < 1).
Truth: the candidate's exact expected CTR per shown item over all users (Population.expected_ctr).
Estimators (training.experiments.ope): IPS, SNIPS, DR (item-position reward model cross-fitted on
the log), Replay (explored lists only). Goal: SNIPS and DR within 10 % of the truth at 50k lists.
The sweep shows the trade-off behind the choice of epsilon 0.3 and N 30 (N at least the pool the
candidates draw from, so their items are in support; no larger, as a slot's weight is N/epsilon and
the variance grows with it; epsilon as small as keeps the CI within about ±7 %, since exploration
costs online CTR: the table prints the logging policy's own exact CTR).

A/B. `--experiments` seeds of simulate_experiment: 4000 participants, 50/50, popularity (the
generator's popularity prior's top-10) vs a personalized model (top-10 of z + N(0, 1)); the share of
95 % delta-method CIs of the absolute and relative CTR lift covering the true lift (goal >= 93 of
100). SRM: 20k users assigned 50/50 and 52/48, tested against the configured 50/50.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the repository on sys.path)

from bundle.policy import explore_slate  # noqa: E402
from features.click_sim import Population, rank, simulate_experiment  # noqa: E402
from training.experiments import ope, stats  # noqa: E402

K, RERANK_POOL, GOAL = 10, 30, 0.10


def models(pop: Population, ranked_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    users = np.arange(pop.n_users)
    z = pop.scores(users)
    rng = np.random.default_rng(2026)
    e0, e1, e2 = (rng.normal(size=z.shape) for _ in range(3))
    logging = rank(z + 0.7 * e0 + 0.5 * e1, ranked_len)
    cand = z + 0.7 * e0 + 0.2 * e2
    pool = logging[:, :RERANK_POOL]
    rerank = np.take_along_axis(pool, rank(np.take_along_axis(cand, pool, axis=1), K), axis=1)
    return logging, {"rerank": rerank, "independent": rank(cand, K)}


def one_log(pop: Population, logging: np.ndarray, eps: float, pool: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, pop.n_users, n)
    slates = [explore_slate(logging[u], K, eps, pool, rng) for u in user]
    items = np.stack([s.items for s in slates])
    return {"user": user, "items": items, "mu": np.stack([s.propensities for s in slates]),
            "explored": np.array([s.explored for s in slates]), "clicks": pop.sample_clicks(user, items, rng).astype(float)}  # fmt: skip


def run_ope(pop: Population, epsilons: list[float], pools: list[int], seeds: list[int], n: int) -> list[dict]:
    logging, cands = models(pop, max(pools + [RERANK_POOL]))
    everyone = np.arange(pop.n_users)
    truth = {c: pop.expected_ctr(everyone, t) for c, t in cands.items()}
    print(f"logging model top-{K} CTR {pop.expected_ctr(everyone, logging[:, :K]):.4f}; truth: " + ", ".join(f"{c} {v:.4f}" for c, v in truth.items()))
    rows = []
    for eps in epsilons:
        for pool in pools:
            sup = {c: ope.support(t, ope.logging_propensities(t, logging, K, eps, pool)) for c, t in cands.items()}
            # the logging policy's own online CTR: its random branch puts each pool item at each position w.p. 1/N
            explore = pop.theta(K).sum() * pop.relevance(everyone, logging[:, :pool]).mean(axis=1)
            online = float(((1 - eps) * pop.expected_clicks(everyone, logging[:, :K]) + eps * explore).mean() / K)
            per = {c: {e: [] for e in ("ips", "snips", "dr", "replay")} for c in cands}
            for seed in seeds:
                log = one_log(pop, logging, eps, pool, n, seed)
                for c, t in cands.items():
                    tgt = t[log["user"]]
                    q = ope.crossfit_q_target(log["items"], log["clicks"], tgt, pop.n_items, seed=seed)
                    res = ope.evaluate(log["items"], log["clicks"], log["mu"], tgt, explored=log["explored"], q_target=q)
                    for e, v in res["estimates"].items():
                        per[c][e].append(v)
            for c in cands:
                for e, vals in per[c].items():
                    err = np.array([v["ctr"] / truth[c] - 1.0 for v in vals])
                    width = np.array([(v["ctr_high"] - v["ctr_low"]) / truth[c] for v in vals])
                    covered = sum(v["ctr_low"] <= truth[c] <= v["ctr_high"] for v in vals)
                    rows.append({"epsilon": eps, "pool": pool, "logging_ctr": online, "candidate": c, "estimator": e, "support": sup[c], "truth_ctr": truth[c],
                                 "mean_ctr": float(np.mean([v["ctr"] for v in vals])), "bias_rel": float(err.mean()), "max_abs_err_rel": float(np.abs(err).max()),
                                 "ci_width_rel": float(width.mean()), "ci_covered": f"{covered}/{len(vals)}", "seeds": len(vals)})  # fmt: skip
            print(f"  eps {eps} pool {pool}: the logging policy's online CTR {online:.4f}", flush=True)
    return rows


def run_ab(pop: Population, experiments: int) -> dict:
    everyone = np.arange(pop.n_users)
    popular = np.argsort(-pop.latent.pop_logit, kind="stable")[:K]
    personal = pop.top_k(everyone, K, noise=1.0, rng=np.random.default_rng(7))
    arms = {"popularity": lambda u: np.tile(popular, (len(u), 1)), "personalized": lambda u: personal[u]}
    weights = {"popularity": 0.5, "personalized": 0.5}
    cover, srm_fp = {"absolute": 0, "relative": 0}, 0
    for seed in range(experiments):
        log = simulate_experiment(pop, arms, weights, 4000, np.random.default_rng(seed))
        t, c = log.true_ctr["personalized"], log.true_ctr["popularity"]
        rep = stats.report(log.unit, log.arm, (log.lists >= 0).sum(axis=1), log.clicks.sum(axis=1), control="popularity", weights=weights, assigned=log.assigned)
        lift = rep["arms"]["personalized"]["lift"]["ctr"]
        cover["absolute"] += lift["absolute"]["low"] <= t - c <= lift["absolute"]["high"]
        cover["relative"] += lift["relative"]["low"] <= t / c - 1 <= lift["relative"]["high"]
        srm_fp += rep["srm"]["mismatch"]
    srm_rows = {}
    for label, split in (("50/50", 0.5), ("52/48", 0.52)):
        fired = [stats.srm({"a": int(a), "b": 20_000 - int(a)}, {"a": 1, "b": 1}) for a in np.random.default_rng(11).binomial(20_000, split, experiments)]
        srm_rows[label] = {"fired": sum(s.mismatch for s in fired), "of": experiments, "median_p": float(np.median([s.p_value for s in fired]))}
    return {"experiments": experiments, "participants": 4000, "true_ctr": log.true_ctr, "true_lift_rel": log.true_ctr["personalized"] / log.true_ctr["popularity"] - 1,
            "ci_covers_true_lift": cover, "srm_fired_in_these_experiments": srm_fp, "srm_20k_users": srm_rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "ope")
    p.add_argument("--epsilons", default="0.1,0.3,0.5", help="logging epsilons (default 0.1,0.3,0.5)")
    p.add_argument("--pools", default="10,30,100", help="exploration pool sizes N (default 10,30,100)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="log seeds (default 0-4)")
    p.add_argument("--exposures", type=int, default=50_000, help="logged lists per seed (default 50000)")
    p.add_argument("--experiments", type=int, default=100, help="simulated A/B tests (default 100; 0 skips)")
    args = p.parse_args(argv)
    epsilons = harness.numbers(p, "--epsilons", args.epsilons, float)
    pools, seeds = harness.numbers(p, "--pools", args.pools), harness.numbers(p, "--seeds", args.seeds)
    if not epsilons or not pools or not seeds or any(not 0 < e <= 1 for e in epsilons) or any(n < K for n in pools) or args.exposures < 2:
        p.error(f"give epsilons in (0, 1], pools >= k={K}, seeds, and at least 2 exposures")
    started = time.perf_counter()
    pop = Population()
    rows = run_ope(pop, epsilons, pools, seeds, args.exposures)
    ab = run_ab(pop, args.experiments) if args.experiments > 0 else None
    met = [r for r in rows if r["candidate"] == "rerank" and r["estimator"] in ("snips", "dr")]
    report = {"k": K, "exposures": args.exposures, "seeds": seeds, "goal": f"SNIPS and DR CTR within {GOAL:.0%} of the truth on every seed",
              "ope": rows, "ab": ab, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    out = harness.write(report, args, "ope", script=__file__, argv=argv, libraries=["scipy"])

    print(f"\nOPE at {args.exposures} lists, seeds {seeds} (errors relative to the true CTR; width: CI width / truth)")
    head = ["eps/N", "candidate", "estimator", "support", "truth", "mean est", "bias", "max |err|", "CI width", "covered"]
    print(harness.table(head, ([f"{r['epsilon']}/{r['pool']}", r["candidate"], r["estimator"], r["support"], r["truth_ctr"], r["mean_ctr"], r["bias_rel"],
                                r["max_abs_err_rel"], r["ci_width_rel"], r["ci_covered"]] for r in rows), digits=3, first=8, width=11))  # fmt: skip
    ok = [(r["epsilon"], r["pool"], round(r["support"], 3)) for r in met if r["max_abs_err_rel"] <= GOAL]
    print(f"rerank candidate, SNIPS and DR within {GOAL:.0%} on every seed at (eps, N, support): {sorted({x for x in ok if ok.count(x) == 2})}")
    if ab:
        print(f"\nA/B: {ab['experiments']} experiments, true CTR {ab['true_ctr']}, true relative lift {ab['true_lift_rel']:.4f}")
        print(f"  95% CI covers the true lift: absolute {ab['ci_covers_true_lift']['absolute']}/{ab['experiments']}, relative {ab['ci_covers_true_lift']['relative']}/{ab['experiments']}")
        print(f"  SRM (p < {stats.SRM_THRESHOLD}) at 20k users: " + "; ".join(f"{k} split fired {v['fired']}/{v['of']} (median p {v['median_p']:.2g})" for k, v in ab["srm_20k_users"].items()))
    print(f"\nwrote {out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
