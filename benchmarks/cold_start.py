"""Cold-start evaluation of the hybrid model: never-seen items and brand-new users.

    python benchmarks/cold_start.py --data ml100k                 # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/cold_start.py --data ml100k:/path/to/ml-100k
    python benchmarks/cold_start.py --data synthetic
    python benchmarks/cold_start.py --data synthetic --set model.item_id_dropout=0.3

Runs `training.cold_start.item_cold_start` and `user_cold_start` (protocols in that module's
doc), prints two tables and writes JSON (default benchmarks/results/cold_start_<data>.json)
with the command and the machine. Exit status 2 when ML-100k is asked for but absent.
Goals: hybrid NDCG@10 >= 1.5x content-only on item cold start; genre match >= 0.8 for cold users.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)

DEFAULT_CONFIG = harness.CONFIGS / "hybrid.yaml"
ITEM_GOAL, GENRE_GOAL = 1.5, 0.8


def table(title: str, metrics: dict[str, float], models: list[str], columns: list[str]) -> str:
    return title + "\n" + harness.table(["  model", *columns], [[f"  {m}", *(metrics.get(f"{m}/{c}") for c in columns)] for m in models], first=20)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "cold_start_<data>")
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default configs/hybrid.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--item-holdout", type=float, default=0.10, help="share of items held out (default 0.10)")
    p.add_argument("--user-holdout", type=float, default=0.10, help="share of users held out (default 0.10)")
    p.add_argument("--seed", type=int, default=0, help="holdout seed (default 0)")
    p.add_argument("--truth", choices=["all", "test"], default="all", help="item cold start truth: held-out items' rows of any split (default) or of the test split only")
    p.add_argument("--only", choices=["item", "user"], help="run one experiment only")
    args = p.parse_args(argv)
    data = harness.dataset(p, args.data, source=True)
    if data is None:
        return 2
    name, overrides = data.name, list(data.overrides)

    from training.cold_start import item_cold_start, user_cold_start

    with tempfile.TemporaryDirectory() as tmp:
        overrides += [*harness.offline(tmp), *args.set]
        if (cfg := harness.load(args.config, overrides, "cold_start: error")) is None:
            return 2
        k = cfg.task.eval_k
        results: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        if args.only in (None, "item"):
            results["item_cold_start"] = item_cold_start(cfg, args.item_holdout, args.seed, k, args.truth)
        if args.only in (None, "user"):
            results["user_cold_start"] = user_cold_start(cfg, args.user_holdout, args.seed, k)
        seconds = time.perf_counter() - started

    goals: dict[str, dict] = {}
    if "item_cold_start" in results:
        goals["item_ratio_vs_content"] = harness.goal(ITEM_GOAL, results["item_cold_start"]["ratio_vs_content"])
    if "user_cold_start" in results:
        goals["user_genre_match"] = harness.goal(GENRE_GOAL, results["user_cold_start"]["hybrid/genre_match"])
    report = {
        "dataset": name, "config": harness.repo_relative(args.config),
        "overrides": [o for o in overrides if not o.startswith(("export.output_dir=", "trainer.checkpoint_dir=", "data.path="))], "k": k,
        "holdout": {"items": args.item_holdout, "users": args.user_holdout, "seed": args.seed, "item_truth": args.truth},
        "results": {exp: {key: round(v, 4) for key, v in m.items()} for exp, m in results.items()}, "goals": goals, "seconds": round(seconds, 1),
    }  # fmt: skip
    out = harness.write(report, args, f"cold_start_{name}", script=__file__, argv=argv, libraries=["torch", "torchrec"])

    print(f"\n{name}: cold start, k={k}  ({seconds:.0f} s)")
    if "item_cold_start" in results:
        r = results["item_cold_start"]
        cols = [f"ndcg@{k}", f"recall@{k}", f"precision@{k}", "coverage"]
        print(table(f"\nitem cold start: {r['n_cold_items']:.0f} of {r['n_items']:.0f} items never seen in training; {r['n_users_evaluated']:.0f} users rank ONLY them (truth: {args.truth})", r, ["hybrid", "content", "recency", "random"], cols))
        print(f"  hybrid / content NDCG: {r['ratio_vs_content']:.2f}x (goal >= {ITEM_GOAL}x: {'met' if goals['item_ratio_vs_content']['met'] else 'MISSED'});  warm test NDCG@{k} of the same model {r[f'warm/ndcg@{k}']:.4f}")
    if "user_cold_start" in results:
        r = results["user_cold_start"]
        cols = [f"ndcg@{k}", f"recall@{k}", "genre_match", "avoided_share", "coverage"]
        src = "dataset" if r["stated_from_dataset"] else "derived: 2 top genres of their own ratings"
        print(table(f"\nuser cold start: {r['n_cold_users']:.0f} users never seen in training, served with empty history + stated genres ({src})", r, ["hybrid", "hybrid_no_stated", "hybrid_stated_first", "popularity", "genre_popularity"], cols))
        print(f"  their actual rated items: {r['truth/genre_match']:.3f} carry a stated genre (the level of an exact list)")
        print(f"  hybrid genre match: {r['hybrid/genre_match']:.3f} (goal >= {GENRE_GOAL}: {'met' if goals['user_genre_match']['met'] else 'MISSED'})")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
