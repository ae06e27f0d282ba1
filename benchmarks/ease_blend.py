"""Two-tower x EASE score blend on the MS protocol: still one dot product per (user, item).

    python benchmarks/ease_blend.py --data ml100k --seeds 0,1,2 --set trainer.num_threads=1

Per trainer seed: trains configs/two_tower_ml100k.yaml through training.pipeline's own fit path
(the one `benchmarks/quality.py` runs through `pipeline.train`: same seeding, selection fit on
train with validation choosing the epoch, refit on train + val), keeping the selection model's
embeddings; fits EASE (benchmarks/peers.py) on train for every λ of the grid and on train + val for
the chosen one. The blend, with per-user scale,

    s_u(i) = a · T_u(i) / sd_T(u) + (1 − a) · E_u(i) / sd_E(u),   T = two-tower scores, E = x_u B (EASE),

sd_·(u) the population std of the user's scores over all items, is the dot product of
user [a·u/sd_T(u), (1 − a)·x_u/sd_E(u)] and item [v_i, B[:, i]] (sd_T(u)² = uᵀ Cov(v) u and
sd_E(u)² = x_uᵀ Cov(B[:, i]) x_u: closed forms, `blend_embeddings`). (a, λ) are chosen on validation
NDCG@k with both models fitted on train (a on a 0.05 grid, λ on LAMS), then applied to the models
refitted on train + val and scored on test. The split never changes (seed 42); `--seeds` varies the
two-tower seed only (EASE is deterministic).

Rows: the two-tower alone (the quality.py figure of the same seed), EASE tuned on the blend's λ grid,
EASE tuned on peers.py's own grid (the quality.py EASE row), and the blend. Prints a table and writes
JSON (default benchmarks/results/ease_blend.json); every seed's figures and the (a, λ) it chose are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# peers.EASE_GRID (50-800) plus 300 and 600: 600 is EASE's best validation λ on ML-100k (0.1800 vs 0.1784 at 800)
LAMS = [50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0]
ALPHAS = [round(0.05 * i, 2) for i in range(21)]  # 0 = EASE alone, 1 = two-tower alone
CONFIGS = {"ml100k": "two_tower_ml100k.yaml", "synthetic": "two_tower.yaml"}


# ---------------------------------------------------------------- the blend (numpy only)


def _inv_or_zero(sd: np.ndarray) -> np.ndarray:
    """1/sd, and 0 where sd is 0 (a user whose scores are all equal, e.g. no history: that term drops out)."""
    sd = np.asarray(sd, dtype=np.float64)
    return np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)


def blend_scores(tt: np.ndarray, ease: np.ndarray, a: float) -> np.ndarray:
    """a · T / sd_T(u) + (1 − a) · E / sd_E(u), sd over each row (all items, ddof 0). (users, items) float64."""
    tt, ease = np.asarray(tt, np.float64), np.asarray(ease, np.float64)
    return a * tt * _inv_or_zero(tt.std(axis=1, keepdims=True)) + (1.0 - a) * ease * _inv_or_zero(ease.std(axis=1, keepdims=True))


def _row_sd(rows: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """sqrt(r Cov rᵀ) per row r: the std over items of r · item_vector (item vectors with covariance `cov`)."""
    return np.sqrt(np.clip(np.einsum("ij,jk,ik->i", rows, cov, rows), 0.0, None))[:, None]


def blend_embeddings(user_vec: np.ndarray, item_vec: np.ndarray, history: np.ndarray, b: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) matrices whose product is blend_scores(user_vec @ item_vecᵀ, history @ b, a).

    user = [a·u/sd_T(u), (1 − a)·x_u/sd_E(u)], item = [v_i, B[:, i]]; the per-user stds come from the
    item-side covariances (sd_T(u)² = uᵀ Cov(v) u, sd_E(u)² = x_uᵀ Cov(B[:, i]) x_u, population
    covariance over items), so serving needs no full score row: one extra d x d and n x n matrix.
    """
    u, v = np.asarray(user_vec, np.float64), np.asarray(item_vec, np.float64)
    x, bt = np.asarray(history, np.float64), np.asarray(b, np.float64).T  # bt row i = B[:, i], the item side of x_u B
    cov_v = np.cov(v, rowvar=False, bias=True).reshape(v.shape[1], v.shape[1])
    cov_b = np.cov(bt, rowvar=False, bias=True).reshape(bt.shape[1], bt.shape[1])
    users = np.hstack([a * u * _inv_or_zero(_row_sd(u, cov_v)), (1.0 - a) * x * _inv_or_zero(_row_sd(x, cov_b))])
    return users, np.hstack([v, bt])


# ---------------------------------------------------------------- the two-tower, through the pipeline


def train_two_tower(cfg) -> dict:
    """pipeline.train's fit path (seed, build, selection fit, refit) without export / tracking.

    Returns the selection model's user (history = train) and item embeddings ("val_user", "val_item"),
    the final model's ("test_user" with history = train + val, "test_item"), its test metrics computed
    exactly like pipeline.finish ("test"), the best epoch and the fit seconds."""
    import torch

    from training import evaluation
    from training.pipeline import build_model, context, fit_model, item_counts, prepare, refit
    from training.task import RetrievalTask
    from training.tracking import Tracker
    from training.trainer import pick_device, seed_everything

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    data = prepare(cfg)
    ds = data.dataset
    tracker = Tracker(False, cfg.tracking.tracking_uri, cfg.tracking.experiment)
    seed_everything(cfg.trainer.seed)  # as pipeline.train: the initial weights draw from torch's RNG
    ctx = context(cfg, ds)
    model = build_model(cfg, ds, ctx, device)
    task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items), cfg.model.item_id_dropout)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}  # what fit_model keeps for its refit
    selection = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"refit": False})})
    fit = fit_model(selection, model, task, data, ctx, device, tracker)  # Trainer.fit reseeds itself: no RNG carry-over
    users = np.arange(ds.n_users)

    def embeddings(history) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        with torch.no_grad():
            return (task.user_embeddings(model, ctx, users, history, device).float().cpu().numpy(),
                    task.item_embeddings(model, ctx, device).float().cpu().numpy())  # fmt: skip

    out = dict(zip(("val_user", "val_item"), embeddings(data.train)))
    if cfg.trainer.refit:
        fit = refit(cfg, model, task, data, ctx, device, tracker, fit, init)
    out.update(zip(("test_user", "test_item"), embeddings(data.seen)))
    test_users = np.flatnonzero(np.diff(data.test[0]) > 0)  # as pipeline.finish
    out["test"] = evaluation.ranking_metrics(task.topk(model, ctx, data.seen, test_users, device), data.test[:2], test_users, task.k, ds.n_items)
    out.update(best_epoch=fit.best_epoch, seconds=fit.seconds, data=data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--seeds", default="0", help="comma-separated two-tower seeds (default 0); the split stays seed 42")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds: give at least one seed")
    name, _, path = args.data.partition(":")
    if name not in CONFIGS:
        p.error(f"--data: unknown dataset {name!r} (ml100k or synthetic)")

    import peers  # siblings by name: benchmarks/ is on sys.path (opacus ships a top-level `benchmarks` package)
    import quality

    from training.config import load_config
    from training.evaluation import evaluate_scores

    overrides = ["split.protocol=stratified", *args.set]  # quality.py's default protocol
    if name == "ml100k":
        from features.movielens import resolve_ml100k_path

        try:
            overrides.append(f"data.path={resolve_ml100k_path(path or None)}")
        except FileNotFoundError as e:
            print(f"skipped: {e}", file=sys.stderr)
            return 2

    started = time.perf_counter()
    per_seed, cache = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = load_config(REPO / "configs" / CONFIGS[name], overrides + [
                "tracking.enabled=false", "store.load=false", "trainer.progress=false", f"trainer.seed={seed}",
                f"export.output_dir={tmp}/bundle_{seed}", f"trainer.checkpoint_dir={tmp}/ckpt_{seed}",
            ])  # fmt: skip  (quality.py's per-run overrides)
            k = cfg.task.eval_k
            tt = train_two_tower(cfg)
            data = tt["data"]
            n_users, n_items = data.dataset.n_users, data.dataset.n_items
            val_users, test_users = (np.flatnonzero(np.diff(c[0]) > 0) for c in (data.val, data.test))

            def on_val(scores: np.ndarray) -> dict[str, float]:
                return evaluate_scores(lambda u: scores[u], val_users, data.train[:2], data.val[:2], n_items, k=k)

            def on_test(scores: np.ndarray) -> dict[str, float]:
                return evaluate_scores(lambda u: scores[u], test_users, data.seen[:2], data.test[:2], n_items, k=k)

            if not cache:  # EASE does not depend on the two-tower seed: fitted once
                def ease(csr, lam):
                    e = peers.EASE(lam)
                    e.fit(peers.pair(csr), n_users, n_items)
                    return e

                cache["val"] = {lam: ease(data.train, lam) for lam in LAMS}
                cache["val_ndcg"] = {lam: on_val(e.scores(np.arange(n_users)))[f"ndcg@{k}"] for lam, e in cache["val"].items()}
                lam_e = max(LAMS, key=lambda lam: cache["val_ndcg"][lam])  # ties: the smaller λ
                cache["test"] = {}
                cache["ease"] = {"lam": lam_e, "val_ndcg": cache["val_ndcg"][lam_e], **on_test(ease(data.seen, lam_e).scores(np.arange(n_users)))}
                cache["ease_peers"] = peers.run_peers(data, k=k, names=["ease"])["ease"]
                cache["ease_test"] = lambda lam: cache["test"].setdefault(lam, ease(data.seen, lam))
                cache["x_train"] = peers.to_scipy(data.train, n_users, n_items, np.float64).toarray()
                cache["x_seen"] = peers.to_scipy(data.seen, n_users, n_items, np.float64).toarray()
            x_train, x_seen = cache["x_train"], cache["x_seen"]

            t_val = tt["val_user"].astype(np.float64) @ tt["val_item"].astype(np.float64).T
            e_val = {lam: x_train @ cache["val"][lam].B.astype(np.float64) for lam in LAMS}
            best = None
            for lam in LAMS:
                for a in ALPHAS:
                    v = on_val(blend_scores(t_val, e_val[lam], a))[f"ndcg@{k}"]
                    if best is None or v > best["val_ndcg"]:  # ties: the earlier grid point
                        best = {"a": a, "lam": lam, "val_ndcg": v}
            b = cache["ease_test"](best["lam"]).B.astype(np.float64)
            t_test = tt["test_user"].astype(np.float64) @ tt["test_item"].astype(np.float64).T
            scores = blend_scores(t_test, x_seen @ b, best["a"])
            blend = {**best, **on_test(scores)}
            uv, iv = blend_embeddings(tt["test_user"], tt["test_item"], x_seen, b, best["a"])
            dot = uv @ iv.T
            blend["dot_product_dims"] = int(uv.shape[1])
            blend["dot_product_max_abs_diff"] = float(np.abs(dot - scores).max())
            blend["dot_product_ndcg"] = on_test(dot)[f"ndcg@{k}"]
            row = {
                "seed": seed,
                "two_tower": {**tt["test"], "val_ndcg": on_val(t_val)[f"ndcg@{k}"], "best_epoch": float(tt["best_epoch"]), "train_s": tt["seconds"]},
                "blend": blend,
            }
            per_seed.append(row)
            print(f"seed {seed}: two-tower {row['two_tower'][f'ndcg@{k}']:.4f} (epoch {tt['best_epoch']}, {tt['seconds']:.0f}s) | "
                  f"blend a={best['a']:.2f} lam={best['lam']:g} (val {best['val_ndcg']:.4f}) -> test {blend[f'ndcg@{k}']:.4f} "
                  f"(dot product: max |diff| {blend['dot_product_max_abs_diff']:.1e}, ndcg {blend['dot_product_ndcg']:.4f})", flush=True)  # fmt: skip

    metric_keys = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage"]
    pick = lambda d, extra=(): {key: float(d[key]) for key in [*metric_keys, *extra] if key in d}  # noqa: E731
    ease_peers = cache["ease_peers"]
    models = {
        "trustrec-two-tower": quality.summarize([pick(r["two_tower"], ("val_ndcg", "best_epoch", "train_s")) for r in per_seed]),
        f"ease (blend grid, lam={cache['ease']['lam']:g})": {**quality.summarize([pick(cache["ease"])]), "lam": cache["ease"]["lam"]},
        f"ease (peers.py grid, lam={ease_peers['params']['lam']:g})": {**quality.summarize([pick(ease_peers)]), "lam": ease_peers["params"]["lam"]},
        "blend two-tower + ease (per-user scale)": {
            **quality.summarize([pick(r["blend"], ("a", "lam", "val_ndcg", "dot_product_max_abs_diff", "dot_product_ndcg")) for r in per_seed]),
            "dims": per_seed[0]["blend"]["dot_product_dims"],
        },
    }
    report = {
        "dataset": name,
        "protocol": "ms-recommenders stratified per item 75/25 seed 42",
        "config": f"configs/{CONFIGS[name]}",
        "k": k,
        "seeds": seeds,
        "grid": {"a": ALPHAS, "lam": LAMS},
        "selection": "(a, lam) maximise validation NDCG@k with both models fitted on train; applied to the models refitted on train + val",
        "models": models,
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": quality.machine(),
        "command": "python benchmarks/ease_blend.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / "ease_blend.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")

    print(f"\n{name} / {report['protocol']}  ({report['machine']}, {report['seconds']:.0f} s), seeds {seeds}: mean ± std")
    print(f"{'model':<42}" + "".join(f"{c:>18}" for c in metric_keys[:4]))
    for m, r in models.items():
        print(f"{m:<42}" + "".join(f"  {r[c]:.4f} ± {r[c + '_std']:.4f}" for c in metric_keys[:4]))
    print("blend per seed: " + "; ".join(f"seed {r['seed']} a={r['blend']['a']:.2f} lam={r['blend']['lam']:g} ndcg {r['blend'][f'ndcg@{k}']:.4f}" for r in per_seed))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
