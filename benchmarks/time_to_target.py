"""Seconds of training until test NDCG@10 first reaches a target (issue 3: >= 0.45 within 60 s on 2 CPU cores).

    python benchmarks/time_to_target.py                                  # two_tower_ml100k.yaml, 2 threads, target 0.45
    python benchmarks/time_to_target.py --config configs/hybrid_ml100k.yaml --stage refit
    python benchmarks/time_to_target.py --set trainer.seed=1 --threads 2 --target 0.45

Trains exactly as `trustrec train` does (same data, split, model, Trainer) and, after every
epoch, scores the test split the way the pipeline does (history = train + val, excluded from
the ranking). The probe's own time is paused out of the clock, so `seconds` is the wall time
of training (with the per-epoch validation of the `select` stage) up to the end of the first
epoch whose test NDCG@k >= target.

Stages: `select` = the validated fit on the train split (what early stopping watches);
`refit` = the fit on train + val without validation (`trainer.refit`; also what a scheduled
retrain with a known epoch count runs). Prints a line per epoch and writes JSON
(default benchmarks/results/time_to_target_<config>_<stage>.json). Timing is only meaningful
on a quiet machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "time_to_target_<config>_<stage>")
    p.add_argument("--config", default=str(harness.CONFIGS / "two_tower_ml100k.yaml"))
    p.add_argument("--data", default=None, help="ML-100k folder (default: $TRUSTREC_ML100K or ../shared/data/ml-100k)")
    p.add_argument("--stage", choices=["select", "refit"], default="select")
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the goal is stated for 2 CPU cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args(argv)

    import tempfile

    import torch

    from training import evaluation
    from training.config import load_config
    from training.pipeline import build_model, context, item_counts, prepare
    from training.task import RetrievalTask
    from training.trainer import Trainer, pick_device, seed_everything

    torch.set_num_threads(args.threads)
    overrides = ["tracking.enabled=false", "store.load=false", "trainer.progress=false", *args.set]
    if "movielens" in Path(args.config).read_text():
        source = harness.dataset(p, "ml100k" + (f":{args.data}" if args.data else ""), ["ml100k"])
        if source is None:
            return 2
        overrides[:0] = source.overrides
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*overrides, f"trainer.checkpoint_dir={tmp}"])
        device = pick_device(cfg.trainer.device)
        data = prepare(cfg)
        ds = data.dataset
        seed_everything(cfg.trainer.seed)
        ctx = context(cfg, ds)
        model = build_model(cfg, ds, ctx, device)
        select = args.stage == "select"
        fit_on = data.train if select else data.seen
        task = RetrievalTask(cfg.task, item_counts(fit_on, ds.n_items), cfg.model.item_id_dropout)
        users, key = harness.users_with(data.test), f"ndcg@{task.k}"
        clock = {"start": time.perf_counter(), "paused": 0.0}
        curve: list[dict[str, float]] = []

        def probe(epoch: int, metrics: dict[str, float]) -> None:
            trained_s = time.perf_counter() - clock["start"] - clock["paused"]
            t0 = time.perf_counter()
            test = evaluation.ranking_metrics(task.topk(model, ctx, data.seen, users, device), data.test[:2], users, task.k, ds.n_items)[key]
            clock["paused"] += time.perf_counter() - t0
            curve.append({"epoch": epoch, "seconds": round(trained_s, 4), f"test/{key}": round(test, 4), **{k: round(v, 4) for k, v in metrics.items()}})
            val = f"  val/{key}={metrics[f'val/{key}']:.4f}" if f"val/{key}" in metrics else ""
            print(f"epoch {epoch:3d}  {trained_s:7.1f}s  test/{key}={test:.4f}" + val, flush=True)

        m = cfg.model
        trainer = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, m.user_id_dropout, device, m.demographics_dropout, m.stated_dropout, on_epoch=probe)
        clock["start"] = time.perf_counter()
        trainer.fit(fit_on, data.train if select else None, data.val if select else None, ctx)  # refit: no validation

    hit = next((row for row in curve if row[f"test/{key}"] >= args.target), None)
    report = {"config": str(args.config), "overrides": args.set, "stage": args.stage, "threads": args.threads, "target": args.target,
              "reached": hit is not None, "epoch": hit["epoch"] if hit else None, "seconds": hit["seconds"] if hit else None,
              "best_test": max(row[f"test/{key}"] for row in curve), "curve": curve}  # fmt: skip
    out = harness.write(report, args, f"time_to_target_{Path(args.config).stem}_{args.stage}", script=__file__, argv=argv, libraries=["torch", "torchrec"])
    if hit:
        print(f"\ntest/{key} >= {args.target} at epoch {hit['epoch']} after {hit['seconds']:.1f}s of training ({args.threads} threads)")
    else:
        print(f"\ntest/{key} never reached {args.target} (best {report['best_test']:.4f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
