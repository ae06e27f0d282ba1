r"""Federated (Flower) vs centralized two-tower on ML-100k: NDCG@10, rounds, wall time.

    python benchmarks/federated.py                                   # 10 silos vs centralized
    python benchmarks/federated.py --variants silos,user             # + cross-device (1 user per client)
    python benchmarks/federated.py --variants silos --set federated.strategy=fedprox
    python benchmarks/federated.py --data ml100k:/path/to/ml-100k --rounds 50
    python benchmarks/federated.py --variants user --rounds 100 --out benchmarks/results/federated_ml100k_user.json \
        --central-from benchmarks/results/federated_ml100k.json   # cross-device only, reusing the baseline

Same split (MS Recommenders protocol: 75/25 stratified per item, seed 42), same model and metric
code for every row. Federated validation is the mean over all users of each client's own val
NDCG@10 (clients report per-user means weighted by users), which is what the centralized trainer
monitors, so the rounds-to-95 % figure compares like with like. Goal: federated test NDCG@10
>= 95 % of centralized within <= 100 rounds.

Prints a table, writes JSON (default benchmarks/results/federated_ml100k.json) and a PNG of
validation NDCG@10 per round (default benchmarks/results/federated_ml100k.png).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from harness import REPO  # noqa: E402
from training.config import load_config  # noqa: E402
from training.pipeline import train  # noqa: E402

# per variant: the overrides on top of configs/two_tower_ml100k_federated.yaml
VARIANTS = {
    "silos": [],  # 10 silos, every silo every round
    # cross-device: one user per client, 10 % of them per round; each evaluates its own user
    "user": ["federated.partition=user", "federated.fraction_fit=0.1", "federated.fraction_evaluate=0.1", "federated.min_clients=10",
             "federated.local_batch_size=1", "federated.patience=30"],
}  # fmt: skip


def run(config: str, overrides: list[str], tmp: str, tag: str) -> dict:
    cfg = load_config(REPO / "configs" / config, [*overrides, *harness.offline(tmp, f"-{tag}")])
    started = time.perf_counter()
    result = train(cfg)
    k = cfg.task.eval_k
    return {
        "test_ndcg": result.metrics[f"test/ndcg@{k}"],
        "test": {key.removeprefix("test/"): v for key, v in result.metrics.items() if key.startswith("test/")},
        "best_val_ndcg": result.fit.best_metric,
        "best_step": result.fit.best_epoch,
        "steps_run": result.fit.epochs_run,
        "fit_s": result.fit.seconds,
        "wall_s": time.perf_counter() - started,
        "val_curve": [row[f"val/ndcg@{k}"] for row in result.fit.history],
        "privacy": result.fit.privacy,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    central = report["centralized"]
    ax.axhline(central["best_val_ndcg"], color="black", lw=1, label=f"centralized best val ({central['best_val_ndcg']:.3f})")
    ax.axhline(0.95 * central["best_val_ndcg"], color="black", lw=1, ls="--", label="95 % of centralized")
    ax.plot(range(1, len(central["val_curve"]) + 1), central["val_curve"], color="gray", lw=1, alpha=0.7, label="centralized, per epoch")
    for name, row in report["federated"].items():
        ax.plot(range(1, len(row["val_curve"]) + 1), row["val_curve"], marker=".", lw=1.2, label=f"federated: {name}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"validation NDCG@{report['k']}")
    ax.set_title(f"Flower federated vs centralized, {report['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "federated_<data>")
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH]")
    p.add_argument("--variants", default="silos", help=f"comma-separated, of {','.join(VARIANTS)} (default silos)")
    p.add_argument("--rounds", type=int, default=100, help="round budget (default 100, the goal's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides for the federated runs")
    p.add_argument("--central-from", metavar="JSON", help="reuse the centralized row of an earlier report (same data) instead of retraining it")
    p.add_argument("--plot", help="PNG output path (default: beside the JSON)")
    args = p.parse_args(argv)

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)} (choose from {', '.join(VARIANTS)})")
    source = harness.dataset(p, args.data, ["ml100k"])
    if source is None:
        return 2
    name, data = source.name, source.overrides

    with tempfile.TemporaryDirectory() as tmp:
        central = json.loads(Path(args.central_from).read_text())["centralized"] if args.central_from else run("two_tower_ml100k.yaml", data, tmp, "central")
        print(f"centralized: test NDCG@10 {central['test_ndcg']:.4f} (best val {central['best_val_ndcg']:.4f}, epoch {central['best_step']}), {central['fit_s']:.0f} s", flush=True)
        federated = {}
        for v in variants:
            federated[v] = run("two_tower_ml100k_federated.yaml", data + [f"federated.rounds={args.rounds}", *VARIANTS[v], *args.set], tmp, v)
            print(f"federated {v}: test NDCG@10 {federated[v]['test_ndcg']:.4f}, {federated[v]['steps_run']} rounds, {federated[v]['fit_s']:.0f} s", flush=True)

    target = 0.95 * central["best_val_ndcg"]
    for row in federated.values():
        row["ratio_test_ndcg"] = row["test_ndcg"] / central["test_ndcg"]
        row["rounds_to_95pct_val"] = next((i + 1 for i, v in enumerate(row["val_curve"]) if v >= target), None)
        row["goal_met"] = bool(row["ratio_test_ndcg"] >= 0.95 and row["steps_run"] <= 100)
    report = {
        "dataset": name,
        "protocol": "ms-recommenders stratified per item 75/25 seed 42",
        "k": 10,
        "goal": "federated test NDCG@10 >= 95 % of centralized within <= 100 rounds",
        "centralized": central,
        "federated": federated,
        "timing_note": "wall times from a shared machine are indicative only; rerun on a quiet one",
    }
    out = harness.write(report, args, f"federated_{name}", script=__file__, argv=argv, libraries=["torch", "flwr"])
    png = Path(args.plot or out.with_suffix(".png"))
    plot(report, png)

    print(f"\n{name} / {report['protocol']}")
    print(f"{'model':<24}{'test ndcg@10':>14}{'% of central':>14}{'rounds':>8}{'rounds→95%':>12}{'fit s':>9}")
    print(f"{'centralized':<24}{central['test_ndcg']:>14.4f}{100.0:>14.1f}{central['steps_run']:>8}{'-':>12}{central['fit_s']:>9.0f}")
    for v, row in federated.items():
        r95 = "-" if row["rounds_to_95pct_val"] is None else str(row["rounds_to_95pct_val"])
        print(f"{'federated ' + v:<24}{row['test_ndcg']:>14.4f}{100 * row['ratio_test_ndcg']:>14.1f}{row['steps_run']:>8}{r95:>12}{row['fit_s']:>9.0f}")
    print("(centralized 'rounds' = epochs; rounds→95% = first round whose federated val NDCG@10 reaches 95 % of the centralized best)")
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
