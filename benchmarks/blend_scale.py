"""The two-tower + EASE blend at catalog sizes past 10k items: quality, model size, memory, time.

    python benchmarks/blend_scale.py                        # 10k and 50k items
    python benchmarks/blend_scale.py --sizes 10000,50000,200000

Each size is a synthetic catalog (configs/two_tower.yaml's generator, `--users` users with a mean of
`--interactions` items each, Zipf popularity) trained by configs/two_tower.yaml with blend.ease on and
the blend's defaults (blend.head_items 10,000, blend.rank 256), a short schedule (`--epochs`) and
small grids (`--lambdas`, `--weights`) so that a size takes minutes on 2 cores. Three phases, each in
its own process, whose peak RSS (ru_maxrss) is reported:
  train    data generation, two-tower training, the blend (choice on validation + refit), export
           (ONNX parity), feature store load: `training.pipeline.train`; its wall time is the pipeline's
  evaluate `trustrec evaluate`'s code (training.offline.evaluate_bundle) on the bundle: ONNX Runtime
           user vectors · item vectors. The two-tower alone is scored from the same bundle (the leading
           tower coordinates of both vectors rank as the tower does: a·u/sd_T(u) · v_i, a > 0)
  serve    serving.recommender.Recommender over the bundle and the feature store: `--requests` users
           one by one (histories from the store, so the EASE half is used)
Model size: the served form (user_tower.onnx + item_embeddings.npy) and the whole bundle.
Prints a table and writes JSON (default benchmarks/results/blend_scale.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)


def phase(name: str, overrides: list[str], n_items: int, requests: int) -> dict:
    """One phase in this process; returns its figures with its peak RSS and wall time."""
    import features.synthetic
    import numpy as np

    from training.config import load_config

    # features/synthetic draws 2,048 users x n_items logits at once (200k items: 3.3 GB an array); bound the block to ~4M
    # floats. The data is the same (one generator stream, drawn row after row; checked: identical for chunks of 2,048 and 37)
    features.synthetic._USER_CHUNK = max(1, min(2048, (1 << 22) // n_items))
    cfg = load_config(harness.CONFIGS / "two_tower.yaml", overrides)
    start = time.perf_counter()
    out: dict = {}
    if name == "train":
        from training.pipeline import train

        result = train(cfg)
        m = result.metrics
        out = {"ndcg@10": m["test/ndcg_at_10"], "train_s": result.fit.seconds, "blend_s": m.get("blend/seconds"),
               "blend": result.manifest["blend"], "parity": max(result.manifest["parity"].values())}
    elif name == "evaluate":
        from bundle.load import open_bundle
        from training import evaluation
        from training.data import user_feed
        from training.model import TowerSpec
        from training.offline import evaluate_bundle
        from training.pipeline import context, prepare

        out["ndcg@10"] = evaluate_bundle(cfg, cfg.export.output_dir)["test/ndcg_at_10"]
        out["peak_rss_mb"] = harness.peak_rss_mb()  # evaluate_bundle's peak, before the tower-only pass
        data = prepare(cfg)
        bundle = open_bundle(Path(cfg.export.output_dir))
        spec, items, ctx = TowerSpec(**bundle.manifest["model"]["spec"]), bundle.item_vectors, context(cfg, data.dataset)
        width = items.shape[1] - bundle.manifest["blend"]["rank"]  # the tower's coordinates
        scores = lambda b: bundle.user_vectors(user_feed(spec, ctx, b, data.seen))[:, :width] @ items[:, :width].T  # noqa: E731
        out["tower_ndcg@10"] = evaluation.evaluate_scores(scores, harness.users_with(data.test), data.seen[:2], data.test[:2], spec.n_items, k=10,
                                                          batch_size=max(1, (1 << 22) // spec.n_items))["ndcg@10"]  # fmt: skip
    elif name == "serve":
        from features.store import FeatureStore
        from serving.recommender import Recommender

        rec = Recommender.from_dir(Path(cfg.export.output_dir), store=FeatureStore(cfg.store.url))
        ids = list(rec.user_vocab.ids)
        pick = np.random.default_rng(0).choice(len(ids), min(requests, len(ids)), replace=False)
        t = time.perf_counter()
        answers = [rec.recommend(ids[i], k=10) for i in pick]
        out = {"ms_per_request": 1000 * (time.perf_counter() - t) / len(pick), "personalized": sum(a["personalized"] for a in answers) / len(answers)}
    out.setdefault("peak_rss_mb", harness.peak_rss_mb())
    out["wall_s"] = time.perf_counter() - start
    return out


def run_phase(name: str, overrides: list[str], n_items: int, requests: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--phase-args", json.dumps({"overrides": overrides, "n_items": n_items, "requests": requests})]
    return json.loads(harness.run_child(cmd, f"{name} phase").strip().splitlines()[-1])


def size_report(n_items: int, args: argparse.Namespace, tmp: Path) -> dict:
    overrides = harness.offline(tmp, f"-{n_items}") + [
        "data.source=synthetic", f"data.synthetic.n_items={n_items}", f"data.synthetic.n_users={args.users}",
        f"data.synthetic.mean_interactions_per_user={args.interactions}", f"trainer.epochs={args.epochs}",
        "blend.ease=true", f"blend.lambdas=[{args.lambdas}]", f"blend.weights=[{args.weights}]",
        "store.load=true", f"store.url=sqlite:///{tmp}/store-{n_items}.db", "trainer.num_threads=2", *args.set,
    ]  # fmt: skip
    train = run_phase("train", overrides, n_items, args.requests)
    print(f"{n_items} items: train {train['wall_s']:.0f}s (blend {train['blend_s']:.0f}s), NDCG@10 {train['ndcg@10']:.4f}", file=sys.stderr, flush=True)
    evaluate = run_phase("evaluate", overrides, n_items, args.requests)
    serve = run_phase("serve", overrides, n_items, args.requests)
    bundle = tmp / f"bundle-{n_items}"
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    tower, items, whole = mb(bundle / "user_tower.onnx"), mb(bundle / "item_embeddings.npy"), sum(mb(p) for p in bundle.iterdir() if p.is_file())
    return {
        "n_items": n_items, "n_users": args.users, "blend": train["blend"],
        "ndcg@10": {"tower": evaluate["tower_ndcg@10"], "blend": evaluate["ndcg@10"], "blend_in_training": train["ndcg@10"]},
        "size_mb": {"served": tower + items, "user_tower_onnx": tower, "item_embeddings": items, "bundle": whole},
        "peak_rss_mb": {"train": train["peak_rss_mb"], "evaluate": evaluate["peak_rss_mb"], "serve": serve["peak_rss_mb"]},
        "seconds": {"pipeline": train["wall_s"] + evaluate["wall_s"], "train_phase": train["wall_s"], "train_s_reported": train["train_s"],
                    "blend": train["blend_s"], "evaluate": evaluate["wall_s"]},
        "parity": train["parity"], "serve_ms_per_request": serve["ms_per_request"], "serve_personalized": serve["personalized"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "blend_scale")
    p.add_argument("--sizes", default="10000,50000", help="catalog sizes (items), comma-separated")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users per catalog")
    p.add_argument("--interactions", type=float, default=30.0, help="mean interactions per user")
    p.add_argument("--epochs", type=int, default=8, help="trainer.epochs of the two-tower")
    p.add_argument("--lambdas", default="200,1000", help="blend.lambdas")
    p.add_argument("--weights", default="0.5,0.7,0.9", help="blend.weights")
    p.add_argument("--requests", type=int, default=200, help="serve phase: users asked for, one at a time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # one phase, in its own process (run_phase)
        print(json.dumps(phase(args.phase, **json.loads(args.phase_args))))
        return 0
    sizes = harness.numbers(p, "--sizes", args.sizes)
    harness.numbers(p, "--lambdas", args.lambdas, float)
    harness.numbers(p, "--weights", args.weights, float)
    with tempfile.TemporaryDirectory(prefix="blend_scale-") as tmp:
        rows = [size_report(n, args, Path(tmp)) for n in sizes]
    report = {"settings": {k: getattr(args, k) for k in ("users", "interactions", "epochs", "lambdas", "weights", "requests", "set")}, "sizes": rows}
    out = harness.write(report, args, "blend_scale", script=__file__, argv=argv, libraries=["torch", "onnxruntime", "scipy"])
    print(harness.table(
        ["items", "tower ndcg", "blend ndcg", "served MB", "train MB", "eval MB", "serve MB", "pipeline s", "blend s", "parity"],
        [[r["n_items"], r["ndcg@10"]["tower"], r["ndcg@10"]["blend"], round(r["size_mb"]["served"], 1), round(r["peak_rss_mb"]["train"]),
          round(r["peak_rss_mb"]["evaluate"]), round(r["peak_rss_mb"]["serve"]), round(r["seconds"]["pipeline"]), round(r["seconds"]["blend"]),
          f"{r['parity']:.1e}"] for r in rows], first=8, width=12))  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
