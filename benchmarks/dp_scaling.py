r"""What a larger user base buys DP-EASE: validation NDCG@10 as if there were s times the users.

    python benchmarks/dp_scaling.py --data ml1m-implicit --epsilons 8,1 --scales 1,2,4 --seeds 0,1,2
    python benchmarks/dp_scaling.py --data ml100k --epsilons 8 --scales 1,2,4,8

DP-EASE's noise is fixed by (ε, δ) while its signal, the Gram of unit-norm histories, grows with the
members: s times the users (with the same tastes) is the same release as this one with σ / s (and
δ 1 / (s·members)). So each row releases the members' *train* Gram with noise σ(ε, 1/(s·m)) / s, fits
EASE with the product's λ and prior rules evaluated at s·m members (training/privacy/gram.py), and
scores the members' validation items (history: train), against the same statistic without noise at
the best λ of a grid (the non-private ceiling of the same model on the same data). Validation only:
the test split is never read. Split and members: configs/ease_dp_<data>.yaml (audit holdout 0.2, drawn
per seed as benchmarks/privacy.py does). An estimate: real extra users bring new tastes and new items,
which this scaling does not.

Prints a table and writes JSON (default benchmarks/results/dp_scaling_<data>.json).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness by name
import harness  # noqa: E402  (puts the repository on sys.path too)

CONFIGS = {"ml100k": "ease_dp_ml100k.yaml", "ml1m-implicit": "ease_dp_ml1m.yaml", "synthetic": "ease_dp.yaml"}
CEILING_LAMBDAS = (3.0, 6.0, 12.0, 24.0)  # the unit-row Gram's scale: ML-1M's validation best was 6-12 (of 3-48)


def val_ndcg(g: np.ndarray, lam: float, noisy: bool, data, users: np.ndarray, k: int, prior: float = 0.0) -> float:
    from training import evaluation
    from training.privacy import gram

    g = g.copy()
    cold = g.sum(axis=1)
    if prior > 0:
        g += prior * gram.popularity_prior(cold)
    p, q, rank = gram.ease_from_release(g, lam, None, noisy=noisy)
    model = gram.GramEase(len(g), lam, rank, p.astype(np.float32), q.astype(np.float32), cold)
    return evaluation.ranking_metrics(model.topk(data.train, users, k), data.val[:2], users, k, len(g))[f"ndcg@{k}"]


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "dp_scaling_<data>")
    p.add_argument("--data", default="ml1m-implicit", help="ml1m-implicit[:PATH], ml100k[:PATH] or synthetic")
    p.add_argument("--epsilons", default="8,1", help="comma-separated finite epsilons (default 8,1)")
    p.add_argument("--scales", default="1,2,4", help="comma-separated user-base multiples s (default 1,2,4)")
    p.add_argument("--seeds", default="0,1,2", help="audit-split and noise seeds (default 0,1,2)")
    args = p.parse_args(argv)
    epsilons = harness.numbers(p, "--epsilons", args.epsilons, float)
    scales = harness.numbers(p, "--scales", args.scales)
    seeds = harness.numbers(p, "--seeds", args.seeds)
    if not epsilons or not scales or not seeds or any(not 0 < e < float("inf") for e in epsilons) or any(s < 1 for s in scales):
        p.error("--epsilons / --scales / --seeds: give finite epsilons > 0, scales >= 1 and at least one seed")
    source = harness.dataset(p, args.data, list(CONFIGS))
    if source is None:
        return 2

    from training.privacy import gram

    started = time.perf_counter()
    rows: dict[tuple[float, int], list[float]] = {}
    ceilings: list[float] = []
    for seed in seeds:
        overrides = ["tracking.enabled=false", "store.load=false", "privacy.ledger=false", f"privacy.audit_seed={seed}", *source.overrides]
        if (loaded := harness.load(harness.CONFIGS / CONFIGS[source.kind], overrides, "dp_scaling.py: error", prepare=True)) is None:
            return 2
        cfg, data = loaded
        k, n = cfg.task.eval_k, data.dataset.n_items
        members = len(harness.users_with(data.train))
        users = harness.users_with(data.val)
        stat = gram.gram_statistic(data.train, n)
        ceilings.append(max(val_ndcg(stat, lam, False, data, users, k) for lam in CEILING_LAMBDAS))
        for eps in epsilons:
            for s in scales:
                sigma = gram.gaussian_sigma(eps, 1.0 / (s * members)) / s
                # the rules at s·m members and σ·s, in this Gram's units (EASE on s·G + noise + λ_s I is EASE on
                # G + noise/s + (λ_s/s) I): the noise rule and the floor (8·s·m/n)/s = 8·m/n both come out as below
                lam, mu = gram.release_lambda(sigma, n, members), gram.prior_weight(sigma, n, members)
                noisy = gram.add_noise(stat.copy(), sigma, np.random.default_rng(seed))
                rows.setdefault((eps, s), []).append(val_ndcg(noisy, lam, True, data, users, k, mu))
                print(f"seed {seed} eps {eps:g} x{s} ({s * members} members): sigma/s {sigma:.3f}, lambda {lam:.3g}, val ndcg@{k} {rows[(eps, s)][-1]:.4f} "
                      f"(no noise {ceilings[-1]:.4f})", flush=True)  # fmt: skip

    ceiling = float(np.mean(ceilings))
    table = [{"epsilon": eps, "scale": s, "members": s * members, "val_ndcg": float(np.mean(v)), "val_ndcg_std": float(np.std(v)),
              "ratio_to_no_noise": float(np.mean(v)) / ceiling} for (eps, s), v in rows.items()]  # fmt: skip
    report = {"dataset": source.name, "k": k, "seeds": seeds, "members": members, "no_noise_val_ndcg": ceiling,
              "no_noise_lambdas": list(CEILING_LAMBDAS), "rows": table, "seconds": time.perf_counter() - started,
              "note": "validation only; s x users simulated as sigma / s against the same members' Gram"}  # fmt: skip
    out = harness.write(report, args, f"dp_scaling_{source.name}", script=__file__, argv=argv)
    print(f"\n{source.name}: {members} members, no-noise validation NDCG@{k} {ceiling:.4f} (best λ of {list(CEILING_LAMBDAS)})")
    print(harness.table(["epsilon", "users x", "members", f"val ndcg@{k}", "std", "of no noise"],
                        [[r["epsilon"], r["scale"], r["members"], r["val_ndcg"], r["val_ndcg_std"], r["ratio_to_no_noise"]] for r in table],
                        digits=(0, 0, 4, 4, 3), first=8, width=12))  # fmt: skip
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
