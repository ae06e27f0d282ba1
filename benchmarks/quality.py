"""Offline quality on the Microsoft Recommenders protocol (or temporal leave-last-n).

    python benchmarks/quality.py --data ml100k                 # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/quality.py --data ml100k:/path/to/ml-100k
    python benchmarks/quality.py --data synthetic

Every model is scored by the same metric code on the same split in one run; prints a table
and writes JSON (default benchmarks/results/quality_<dataset>_<protocol>.json).
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
from training.pipeline import popularity_metrics, prepare, train  # noqa: E402

CONFIGS = {"ml100k": REPO / "configs" / "two_tower_ml100k.yaml", "synthetic": REPO / "configs" / "two_tower.yaml"}


def machine() -> str:
    import torch

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--protocol", choices=["stratified", "leave_last_n"], default="stratified")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
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

    with tempfile.TemporaryDirectory() as tmp:
        overrides += ["tracking.enabled=false", "store.load=false", "trainer.progress=false", f"export.output_dir={tmp}/bundle", f"trainer.checkpoint_dir={tmp}/ckpt"]
        cfg = load_config(CONFIGS[name], overrides)
        k = cfg.task.eval_k
        started = time.perf_counter()
        popularity = popularity_metrics(prepare(cfg), k)
        popularity["train_s"] = time.perf_counter() - started
        result = train(cfg)

    ours = {key.removeprefix("test/"): v for key, v in result.metrics.items() if key.startswith("test/")}
    ours["train_s"] = result.fit.seconds
    models = {"trustrec-two-tower": ours, "popularity": popularity}
    report = {
        "dataset": name,
        "protocol": "ms-recommenders stratified per item 75/25 seed 42" if args.protocol == "stratified" else f"leave-last-{cfg.split.n} per user",
        "k": k,
        "models": {m: {key: round(v, 4) for key, v in metrics.items()} for m, metrics in models.items()},
        "machine": machine(),
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"quality_{name}_{args.protocol}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage", "train_s"]
    print(f"\n{name} / {report['protocol']}  ({report['machine']})")
    print(f"{'model':<22}" + "".join(f"{c:>14}" for c in cols))
    for m, metrics in report["models"].items():
        print(f"{m:<22}" + "".join(f"{metrics[c]:>14.4f}" for c in cols))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
