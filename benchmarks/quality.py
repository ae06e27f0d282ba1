"""Offline quality: trustrec (two-tower, hybrid) against peers, same split, same metric code.

    python benchmarks/quality.py --data ml100k                 # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/quality.py --data ml100k:/path/to/ml-100k --protocol leave_last_n
    python benchmarks/quality.py --data synthetic --peers popularity,ease

    python benchmarks/quality.py --data ml100k --seeds 0,1,2    # mean ± std over 3 training seeds

Protocols: `stratified` (Microsoft Recommenders: 75/25 per item, seed 42) and `leave_last_n`.
Peers (benchmarks/peers.py) are tuned on the validation split and refit on train+val.
`--seeds` varies the model seed only (trainer.seed for trustrec; the seed of BPR, BiVAE and ALS),
never the split: each cell is the mean over seeds and the JSON keeps every seed's figures
(`per_seed`) and the standard deviation (`<metric>_std`, population std, ddof=0).
Prints a table and writes JSON (default benchmarks/results/quality_<dataset>_<protocol>.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from harness import REPO  # noqa: E402
from training.config import load_config  # noqa: E402
from training.pipeline import prepare, train  # noqa: E402

CONFIGS = {
    "ml100k": {"trustrec-two-tower": "two_tower_ml100k.yaml", "trustrec-hybrid": "hybrid_ml100k.yaml", "trustrec-two-tower-ease": "two_tower_ease_ml100k.yaml"},
    "synthetic": {"trustrec-two-tower": "two_tower.yaml", "trustrec-hybrid": "hybrid.yaml"},
}
ALL_PEERS = "popularity,ease,bpr,bivae,als"


def summarize(per_seed: list[dict[str, float]]) -> dict:
    """Mean of each metric over seeds, `<metric>_std` (population std) and the per-seed figures."""
    keys = [key for key in per_seed[0] if all(key in r for r in per_seed)]
    out: dict = {}
    for key in keys:
        values = [float(r[key]) for r in per_seed]
        out[key] = round(statistics.fmean(values), 4)
        out[f"{key}_std"] = round(statistics.pstdev(values), 4)
    out["per_seed"] = [{key: round(float(r[key]), 4) for key in keys} for r in per_seed]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--protocol", choices=["stratified", "leave_last_n"], default="stratified")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--peers", default=ALL_PEERS, help=f"comma-separated peers, or '' for none (default {ALL_PEERS})")
    p.add_argument("--models", default=None, help="comma-separated trustrec models to train (default: all of the dataset's)")
    p.add_argument("--seeds", default="0", help="comma-separated model seeds (default 0); the split stays seed 42")
    harness.output_flags(p, "quality_<data>_<protocol>")
    args = p.parse_args(argv)
    seeds = harness.numbers(p, "--seeds", args.seeds)
    if not seeds:
        p.error("--seeds: give at least one seed")
    data = harness.dataset(p, args.data, list(CONFIGS))
    if data is None:
        return 2
    name, overrides = data.name, [f"split.protocol={args.protocol}", *args.set, *data.overrides]

    runs: dict[str, list[dict[str, float]]] = {}  # model -> one metrics dict per seed
    unknown = [m for m in (args.models or "").split(",") if m and m not in CONFIGS[name]]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(CONFIGS[name])}")
    chosen = CONFIGS[name] if args.models is None else {m: CONFIGS[name][m] for m in args.models.split(",") if m}
    if not chosen:
        p.error("--models: name at least one model")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, config) in enumerate(chosen.items()):
            for seed in seeds:
                cfg = load_config(REPO / "configs" / config, [*overrides, *harness.offline(tmp, f"{i}_{seed}"), f"trainer.seed={seed}"])
                result = train(cfg)
                # the peers report training.evaluation's computing names (ndcg@10); run metrics are published as test/ndcg_at_10
                metrics = {key.removeprefix("test/").replace("_at_", "@"): v for key, v in result.metrics.items() if key.startswith("test/")}
                runs.setdefault(model, []).append({**metrics, "train_s": result.fit.seconds, "best_epoch": float(result.fit.best_epoch)})
                print(f"{model} seed {seed}: ndcg@{cfg.task.eval_k} {metrics[f'ndcg@{cfg.task.eval_k}']:.4f} (best epoch {result.fit.best_epoch}, {result.fit.seconds:.0f}s)", flush=True)
    k = cfg.task.eval_k
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        from peers import run_peers  # benchmarks/ is on sys.path (opacus ships a top-level `benchmarks` package)

        prepared = prepare(cfg)
        for seed in seeds:
            for peer, metrics in run_peers(prepared, k=k, names=peers, seed=seed).items():
                runs.setdefault(peer, []).append({**{key: v for key, v in metrics.items() if isinstance(v, float)}, "train_s": metrics["fit_s"]})

    report = {
        "dataset": name,
        "protocol": "ms-recommenders stratified per item 75/25 seed 42" if args.protocol == "stratified" else f"leave-last-{cfg.split.n} per user",
        "k": k,
        "seeds": seeds,
        "models": {m: summarize(per_seed) for m, per_seed in runs.items()},
    }
    out = harness.write(report, args, f"quality_{name}_{args.protocol}", script=__file__, argv=argv, libraries=["torch", "torchrec", "cornac", "implicit"])

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage", "train_s"]
    print(f"\n{name} / {report['protocol']}, seeds {seeds}: mean ± std")
    print(f"{'model':<22}" + "".join(f"{c:>22}" for c in cols))
    for m, metrics in sorted(report["models"].items(), key=lambda kv: -kv[1][f"ndcg@{k}"]):
        cells = [f"{metrics.get(c, float('nan')):.4f} ± {metrics.get(c + '_std', 0.0):.4f}" for c in cols]
        print(f"{m:<22}" + "".join(f" {c:>21}" for c in cells))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
