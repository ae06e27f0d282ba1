"""Offline quality: trustrec (two-tower, hybrid) against peers, same split, same metric code.

    python benchmarks/quality.py --data ml100k                 # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/quality.py --data ml100k:/path/to/ml-100k --protocol leave_last_n
    python benchmarks/quality.py --data synthetic --peers popularity,ease

Protocols: `stratified` (Microsoft Recommenders: 75/25 per item, seed 42) and `leave_last_n`.
Peers (benchmarks/peers.py) are tuned on the validation split and refit on train+val.
Prints a table and writes JSON (default benchmarks/results/quality_<dataset>_<protocol>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import load_config  # noqa: E402
from training.pipeline import prepare, train  # noqa: E402

CONFIGS = {
    "ml100k": {"trustrec-two-tower": "two_tower_ml100k.yaml", "trustrec-hybrid": "hybrid_ml100k.yaml"},
    "synthetic": {"trustrec-two-tower": "two_tower.yaml", "trustrec-hybrid": "hybrid.yaml"},
}
ALL_PEERS = "popularity,ease,bpr,bivae,als"


def machine() -> str:
    import torch

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--protocol", choices=["stratified", "leave_last_n"], default="stratified")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--peers", default=ALL_PEERS, help=f"comma-separated peers, or '' for none (default {ALL_PEERS})")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)

    name, _, path = args.data.partition(":")
    if name not in CONFIGS:
        p.error(f"--data: unknown dataset {name!r} (ml100k or synthetic)")
    overrides = [f"split.protocol={args.protocol}", *args.set]
    if name == "ml100k":
        from features.movielens import resolve_ml100k_path

        try:
            overrides.append(f"data.path={resolve_ml100k_path(path or None)}")
        except FileNotFoundError as e:
            print(f"skipped: {e}", file=sys.stderr)
            return 2

    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, config) in enumerate(CONFIGS[name].items()):
            cfg = load_config(REPO / "configs" / config, overrides + [
                "tracking.enabled=false", "store.load=false", "trainer.progress=false",
                f"export.output_dir={tmp}/bundle{i}", f"trainer.checkpoint_dir={tmp}/ckpt{i}",
            ])  # fmt: skip
            result = train(cfg)
            models[model] = {key.removeprefix("test/"): v for key, v in result.metrics.items() if key.startswith("test/")}
            models[model]["train_s"] = result.fit.seconds
    k = cfg.task.eval_k
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        from peers import run_peers  # benchmarks/ is on sys.path (opacus ships a top-level `benchmarks` package)

        for peer, metrics in run_peers(prepare(cfg), k=k, names=peers).items():
            models[peer] = {key: v for key, v in metrics.items() if isinstance(v, float)}
            models[peer]["train_s"] = metrics["fit_s"]

    report = {
        "dataset": name,
        "protocol": "ms-recommenders stratified per item 75/25 seed 42" if args.protocol == "stratified" else f"leave-last-{cfg.split.n} per user",
        "k": k,
        "models": {m: {key: round(float(v), 4) for key, v in metrics.items()} for m, metrics in models.items()},
        "machine": machine(),
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"quality_{name}_{args.protocol}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage", "train_s"]
    print(f"\n{name} / {report['protocol']}  ({report['machine']})")
    print(f"{'model':<22}" + "".join(f"{c:>14}" for c in cols))
    for m, metrics in sorted(report["models"].items(), key=lambda kv: -kv[1][f"ndcg@{k}"]):
        print(f"{m:<22}" + "".join(f"{metrics.get(c, float('nan')):>14.4f}" for c in cols))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
