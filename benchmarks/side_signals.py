"""Does the data carry signal that the blend's EASE half misses? (issue 16's 0.50 moonshot on ML-100k)

    python benchmarks/side_signals.py --data ml100k              # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/side_signals.py --data synthetic

EASE (the blend's item-item half) sees only which items a user rated. ML-100k also has rating
times, item genres and user demographics, which the tuned two-tower + EASE recipe does not use in its
EASE half. Each family below is added to EASE in closed form and chosen on validation (fitted on
train, the split and λ grid of `--config`: `blend.lambdas`); the test column refits the
validation-chosen variant on train + validation and is for information only, never used to choose:

- time: the user's share of training ratings in each of 30 time bins (quantiles of the training
  timestamps) times each item's share of that bin's ratings ("what was being rated when this user
  was active"), mixed with EASE at weight a, each scaled by its per-user std (training.blend.blend_scores);
- genres (collective EASE, Jeunen et al. 2020): the item x genre matrix appended to X as α-weighted
  pseudo-users, so the Gram gains α² F Fᵀ;
- demographics: gender, age band and occupation one-hots appended as β-weighted pseudo-items on the
  input side (their own columns of B are never ranked).

A family the data lacks (every timestamp equal, no genres, no demographics) is reported as skipped.
Dense n_items² arrays: catalogs up to 5,000 items. Prints a table and writes JSON (default
benchmarks/results/side_signals_<data>.json) with the command and the machine.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)

DEFAULT_CONFIG = harness.CONFIGS / "two_tower_ease_ml100k.yaml"
MAX_ITEMS = 5_000
TIME_BINS = 30
TIME_WEIGHTS = (0.05, 0.1, 0.2, 0.3)
GENRE_WEIGHTS = (1.0, 3.0, 10.0, 30.0)
DEMO_WEIGHTS = (0.3, 1.0, 3.0)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # ML-1M's age bands, applied to ML-100k's ages
GRIDS = {"ease": (None,), "time": TIME_WEIGHTS, "genres": GENRE_WEIGHTS, "demographics": DEMO_WEIGHTS}  # each family's weight grid


def time_scores(inter, users: np.ndarray, n_users: int, n_items: int) -> np.ndarray | None:
    """Per user: Σ_bins (user's share of their ratings in the bin) x (item's share of the bin's ratings)."""
    t = np.asarray(inter.timestamp, np.float64)
    if np.ptp(t) == 0:
        return None
    edges = np.quantile(t, np.linspace(0, 1, TIME_BINS + 1))
    b = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, TIME_BINS - 1)
    u = sp.csr_matrix((np.ones(len(b)), (inter.user, b)), shape=(n_users, TIME_BINS)).toarray()
    u /= np.maximum(u.sum(1, keepdims=True), 1)
    i = sp.csr_matrix((np.ones(len(b)), (inter.item, b)), shape=(n_items, TIME_BINS)).toarray()
    return u[users] @ (i / np.maximum(i.sum(0), 1)).T


def genre_matrix(ds) -> np.ndarray | None:
    if not ds.genre_names:
        return None
    f = np.zeros((ds.n_items, len(ds.genre_names)))
    for i, g in enumerate(ds.items.genres):
        f[i, list(g)] = 1.0
    return f if f.any() else None


def demographics(ds) -> np.ndarray | None:
    """One-hot gender, age band and occupation per user; None where the data has none of them."""
    parts = []
    for values in (ds.users.gender, ds.users.occupation):
        vocab = sorted({v for v in values if v})
        if len(vocab) > 1:
            parts.append(np.asarray([[v == w for w in vocab] for v in values], np.float64))
    age = np.asarray(ds.users.age)
    if (age > 0).any():
        parts.append(np.eye(len(AGE_EDGES) + 1)[np.digitize(age, AGE_EDGES)])
    return np.hstack(parts) if parts else None


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "side_signals_<data>")
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH], ml1m-implicit[:PATH], table:CONFIG.yaml, csv:PATH, lines:PATH or synthetic")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="data, split and blend.lambdas (default configs/two_tower_ease_ml100k.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    data = harness.dataset(p, args.data, harness.ALL_KINDS, source=True)
    if data is None:
        return 2
    from training import blend, evaluation

    with tempfile.TemporaryDirectory() as tmp:
        protocol = harness.protocol(p, data, None)  # given for a dataset shipped with its test part (ml1m-implicit), else stratified
        loaded = harness.load(args.config, [*data.overrides, f"split.protocol={protocol}", *harness.offline(tmp), *args.set], "side_signals: error", prepare=True)
    if loaded is None:
        return 2
    cfg, prep = loaded
    ds, parts, k = prep.dataset, prep.split, cfg.task.eval_k
    n_u, n_i = ds.n_users, ds.n_items
    if n_i > MAX_ITEMS:
        p.error(f"--data: {n_i} items; this probe holds dense n_items² arrays (at most {MAX_ITEMS})")
    started = time.perf_counter()
    from features.schema import Interactions

    stages = {"val": (parts.train, prep.train, prep.val), "test": (Interactions.concat([parts.train, parts.val]), prep.seen, prep.test)}

    def setup(stage: str):
        inter, seen, truth = stages[stage]
        users = np.flatnonzero(np.diff(truth[0]) > 0)
        return inter, seen, truth, users, blend.binary_matrix(seen, np.arange(n_u), n_i)

    def ndcg(scores: np.ndarray, seen, truth, users) -> float:
        top = evaluation.topk_from_scores(np.asarray(scores), k, exclude=seen[:2], exclude_rows=users)
        return float(evaluation.ranking_metrics(top, truth[:2], users, k, n_i)[f"ndcg@{k}"])

    genres, demo = genre_matrix(ds), demographics(ds)

    def variant(stage: str, family: str, lam: float, w: float | None) -> float:
        inter, seen, truth, users, x = setup(stage)
        g = (x.T @ x).toarray()
        if family == "genres":
            return ndcg(x[users] @ blend.ease_matrix(g + w**2 * genres @ genres.T, lam), seen, truth, users)
        if family == "demographics":
            a = np.hstack([x.toarray(), w * demo])
            return ndcg(a[users] @ blend.ease_matrix(a.T @ a, lam)[:, :n_i], seen, truth, users)
        e = x[users] @ blend.ease_matrix(g, lam)
        if family == "time":
            return ndcg(blend.blend_scores(time_scores(inter, users, n_u, n_i), np.asarray(e), w), seen, truth, users)
        return ndcg(e, seen, truth, users)

    lambdas = list(cfg.blend.lambdas)
    has = {"ease": True, "time": np.ptp(np.asarray(parts.train.timestamp)) > 0, "genres": genres is not None, "demographics": demo is not None}
    rows, results = [], {}
    for family, weights in GRIDS.items():
        if not has[family]:
            results[family] = {"skipped": "the data has none"}
            rows.append([family, None, None, None, None])
            continue
        grid = {(lam, w): variant("val", family, lam, w) for lam in lambdas for w in weights}
        (lam, w), best = max(grid.items(), key=lambda kv: kv[1])
        test = variant("test", family, lam, w)
        results[family] = {"lambda": lam, "weight": w, "val_ndcg": round(best, 4), "test_ndcg": round(test, 4),
                           "grid": [{"lambda": a, "weight": b, "val_ndcg": round(v, 4)} for (a, b), v in grid.items()]}  # fmt: skip
        rows.append([family, lam, w, best, test])
    base = results["ease"]["val_ndcg"]
    chosen = [f for f, r in results.items() if f != "ease" and r.get("val_ndcg", -1) > base]
    seconds = time.perf_counter() - started
    report = {"dataset": data.name, "config": harness.repo_relative(args.config), "protocol": harness.PROTOCOLS[protocol], "k": k, "lambdas": lambdas, "time_bins": TIME_BINS,
              "results": results, "above_ease_on_validation": chosen, "seconds": round(seconds, 1)}  # fmt: skip
    out = harness.write(report, args, f"side_signals_{data.name}", script=__file__, argv=argv)
    print(f"\n{data.name}: EASE plus one side signal, chosen on validation (NDCG@{k}; test for information)  ({seconds:.0f} s)")
    print(harness.table(["  family", "lambda", "weight", "val", "test"], [[f"  {r[0]}", *r[1:]] for r in rows], digits=[0, 2, 4, 4], first=16))
    print(f"  above EASE on validation: {', '.join(chosen) or 'none'}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
