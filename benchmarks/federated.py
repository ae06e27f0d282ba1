r"""Federated (Flower) vs centralized two-tower: NDCG@10, rounds, wall time.

    python benchmarks/federated.py                                   # ML-100k: 10 silos vs centralized
    python benchmarks/federated.py --variants silos,user             # + cross-device (1 user per client)
    python benchmarks/federated.py --variants silos --set federated.strategy=fedprox
    python benchmarks/federated.py --data ml100k:/path/to/ml-100k --rounds 50
    python benchmarks/federated.py --variants user --rounds 100 --out benchmarks/results/federated_ml100k_user.json \
        --central-from benchmarks/results/federated_ml100k.json   # cross-device only, reusing the baseline
    python benchmarks/federated.py --data ml1m-implicit              # issue 17: 6,040 one-user clients, plain + DP at eps 8
    python benchmarks/federated.py --data ml1m-implicit --variants dp --epsilon 8 --out /tmp/dp.json   # one variant
    python benchmarks/federated.py --data ml1m-implicit --variants '' --reuse /tmp/plain.json --reuse /tmp/dp.json --record
    python benchmarks/federated.py --data ml1m-implicit --variants gram,gram_dp --epsilon 8   # federated EASE, plain + DP

ML-100k: same split (MS Recommenders protocol: 75/25 stratified per item, seed 42), same model and
metric code for every row. Federated validation is the mean over all users of each client's own val
NDCG@10 (clients report per-user means weighted by users), which is what the centralized trainer
monitors, so the rounds-to-95 % figure compares like with like. Goal: federated test NDCG@10
>= 95 % of centralized within <= 100 rounds.

ML-1M implicit (issue 17; configs/two_tower_ml1m_federated.yaml, the dataset's own test split):
cross-device, one user per client (6,040), poisson client sampling, server-side validation, without
DP (`plain`) and with client-level DP at --epsilon (`dp`, delta 1/6,040, RDP accountant of the
subsampled Gaussian). The centralized row is reused from benchmarks/results/quality_ml1m-implicit_given.json
(benchmarks/quality.py, the generic two-tower recipe) unless --central-from names another report.
Goal: federated test NDCG@10 >= 90 % of centralized without DP, and the DP figure at eps 8.
`gram` / `gram_dp` (configs/ease_federated_ml1m.yaml): federated EASE, every client sending its item
Gram part once (training/federated/gram.py); their rows also carry `ratio_to_centralized` against
the same record's centralized EASE and best trustrec model.
--reuse takes federated rows from earlier reports of this script (variants run in parallel).

Prints a table, writes JSON (default benchmarks/results/federated_<data>.json) and a PNG of
validation NDCG@10 per round beside it.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from training.config import load_config  # noqa: E402
from training.pipeline import train  # noqa: E402

# per variant: the overrides on top of configs/two_tower_ml100k_federated.yaml
VARIANTS = {
    "silos": [],  # 10 silos, every silo every round
    # cross-device: one user per client, 10 % of them per round; each evaluates its own user
    "user": ["federated.partition=user", "federated.fraction_fit=0.1", "federated.fraction_evaluate=0.1", "federated.min_clients=10",
             "federated.local_batch_size=1", "federated.patience=30"],
}  # fmt: skip
# ML-1M implicit: (config, overrides) per variant (dp variants add the target epsilon). plain / dp: the
# two-tower by FedAdam; gram / gram_dp: federated EASE (each client sends its Gram part once)
ML1M_VARIANTS = {"plain": ("two_tower_ml1m_federated.yaml", []), "dp": ("two_tower_ml1m_federated.yaml", ["federated.dp=true"]),
                 "gram": ("ease_federated_ml1m.yaml", []), "gram_dp": ("ease_federated_ml1m.yaml", ["federated.dp=true"])}  # fmt: skip
ML1M_CENTRAL = harness.RESULTS / "quality_ml1m-implicit_given.json"


def run(config: str, overrides: list[str], tmp: str, tag: str) -> dict:
    cfg = load_config(harness.CONFIGS / config, [*overrides, *harness.offline(tmp, f"-{tag}")])
    started = time.perf_counter()
    result = train(cfg)
    k, fit, wall_s = cfg.task.eval_k, result.fit, time.perf_counter() - started
    val = [row for row in fit.history if f"val/ndcg@{k}" in row]
    per_round = [int(row["federated/clients_fit"]) for row in fit.history if "federated/clients_fit" in row]
    if not per_round and (fit.privacy or {}).get("strategy") == "gram":  # federated EASE: fixed cohorts, each client once
        n, c = fit.privacy["clients"], fit.privacy["clients_per_round"]
        per_round = [min(c, n - r * c) for r in range(fit.privacy["rounds"])]
    test = {key.removeprefix("test/"): v for key, v in result.metrics.items() if key.startswith("test/")}
    return {"test_ndcg": result.metrics[f"test/ndcg@{k}"], "test": test,
            "best_val_ndcg": fit.best_metric, "best_step": fit.best_epoch, "steps_run": fit.epochs_run, "fit_s": fit.seconds, "wall_s": wall_s,
            "val_curve": [row[f"val/ndcg@{k}"] for row in val], "val_rounds": [int(row["epoch"]) for row in val],
            "clients_per_round": per_round,
            "privacy": fit.privacy, "config": {"file": f"configs/{config}", "overrides": overrides}}  # fmt: skip


def central_row(path: str) -> dict:
    """The centralized row of an earlier report: this script's ("centralized") or benchmarks/quality.py's
    (its trustrec-two-tower model; no validation curve there)."""
    report = json.loads(Path(path).read_text())
    if "centralized" in report:
        return report["centralized"]
    m = report["models"]["trustrec-two-tower"]
    return {"test_ndcg": m["ndcg@10"], "best_val_ndcg": None, "best_step": int(m["best_epoch"]), "steps_run": None, "fit_s": m["train_s"],
            "val_curve": [], "source": f"{path} ({report.get('command', '')})"}  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    central, share = report["centralized"], report.get("goal_share", 0.95)
    level, what = (central["best_val_ndcg"], "best val") if central.get("best_val_ndcg") is not None else (central["test_ndcg"], "test")
    ax.axhline(level, color="black", lw=1, label=f"centralized {what} ({level:.3f})" + (": test, not the curves' val split" if what == "test" else ""))
    ax.axhline(share * level, color="black", lw=1, ls="--", label=f"{100 * share:.0f} % of centralized")
    if central["val_curve"]:
        ax.plot(range(1, len(central["val_curve"]) + 1), central["val_curve"], color="gray", lw=1, alpha=0.7, label="centralized, per epoch")
    for name, row in report["federated"].items():
        if not row["val_curve"]:  # federated EASE: one pass, no rounds of training to plot
            continue
        ax.plot(row.get("val_rounds") or range(1, len(row["val_curve"]) + 1), row["val_curve"], marker=".", lw=1.2, label=f"federated: {name}")
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
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or ml1m-implicit[:PATH]")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)} (ml100k, default silos) or {','.join(ML1M_VARIANTS)} (ml1m-implicit, default both)")
    p.add_argument("--rounds", type=int, default=None, help="round budget (default: 100 on ml100k, the goal's; the config's on ml1m-implicit)")
    p.add_argument("--epsilon", type=float, default=8.0, help="ml1m-implicit dp variant: the target epsilon (default 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides for the federated runs")
    p.add_argument("--central-from", metavar="JSON", help="reuse the centralized row of an earlier report (same data) instead of retraining it; "
                   "on ml1m-implicit default benchmarks/results/quality_ml1m-implicit_given.json when present")  # fmt: skip
    p.add_argument("--reuse", action="append", default=[], metavar="JSON", help="take the federated rows of an earlier report of this script (same data)")
    p.add_argument("--plot", help="PNG output path (default: beside the JSON)")
    args = p.parse_args(argv)

    source = harness.dataset(p, args.data, ["ml100k", "ml1m-implicit"])
    if source is None:
        return 2
    ml1m = source.kind == "ml1m-implicit"
    name, data = source.name, [*source.overrides, *(["split.protocol=given"] if ml1m else [])]
    table_ = ML1M_VARIANTS if ml1m else VARIANTS
    variants = [v for v in (args.variants if args.variants is not None else ("plain,dp" if ml1m else "silos")).split(",") if v]
    if unknown := set(variants) - set(table_):
        p.error(f"--variants: unknown {sorted(unknown)} (choose from {', '.join(table_)})")
    config, share = (None, 0.90) if ml1m else ("two_tower_ml100k_federated.yaml", 0.95)
    rounds = [] if args.rounds is None and ml1m else [f"federated.rounds={args.rounds or 100}"]
    central_from = args.central_from or (str(ML1M_CENTRAL) if ml1m and ML1M_CENTRAL.exists() else None)

    with tempfile.TemporaryDirectory() as tmp:
        if central_from:
            central = central_row(central_from)
        elif ml1m:
            p.error("--central-from: ml1m-implicit needs the centralized row (run benchmarks/quality.py --data ml1m-implicit first)")
        else:
            central = run("two_tower_ml100k.yaml", data, tmp, "central")
        print(f"centralized: test NDCG@10 {central['test_ndcg']:.4f}, {central['fit_s']:.0f} s", flush=True)
        federated = {}
        for path in args.reuse:
            federated.update(json.loads(Path(path).read_text())["federated"])
        for v in variants:
            extra = [f"federated.target_epsilon={args.epsilon}"] if v.endswith("dp") else []
            file, overrides = table_[v] if ml1m else (config, table_[v])
            federated[v] = run(file, data + ([] if v.startswith("gram") else rounds) + overrides + extra + args.set, tmp, v)
            print(f"federated {v}: test NDCG@10 {federated[v]['test_ndcg']:.4f}, {federated[v]['steps_run']} rounds, {federated[v]['fit_s']:.0f} s", flush=True)

    target = None if central.get("best_val_ndcg") is None else share * central["best_val_ndcg"]
    for row in federated.values():
        row["ratio_test_ndcg"] = row["test_ndcg"] / central["test_ndcg"]
        row["rounds_to_goal_val"] = None if target is None else next((r for r, v in zip(row.get("val_rounds") or range(1, len(row["val_curve"]) + 1), row["val_curve"]) if v >= target), None)
        if not ml1m:
            row["rounds_to_95pct_val"] = row["rounds_to_goal_val"]  # the key benchmarks/results_page.py reads
        row["goal_met"] = bool(row["ratio_test_ndcg"] >= share and (ml1m or row["steps_run"] <= 100))
        if row.get("clients_per_round"):
            row["clients_per_round_mean"] = sum(row["clients_per_round"]) / len(row["clients_per_round"])
    goal = ("federated test NDCG@10 >= 90 % of centralized without DP (6,040 one-user clients), and the DP figure at eps 8" if ml1m
            else "federated test NDCG@10 >= 95 % of centralized within <= 100 rounds")  # fmt: skip
    quality = next((f for f in (ML1M_CENTRAL, harness.RECORD / ML1M_CENTRAL.name) if f.exists()), None)
    if ml1m and quality is not None:  # federated EASE's own centralized twin, and the best centralized model, from the same record
        models = json.loads(quality.read_text())["models"]
        best = max((m for m in models if m.startswith("trustrec")), key=lambda m: models[m]["ndcg@10"])
        refs = {"ease": models["ease"]["ndcg@10"], best: models[best]["ndcg@10"]}
        for v, row in federated.items():
            row["ratio_to_centralized"] = {m: row["test_ndcg"] / value for m, value in refs.items()}
    report = {"dataset": name, "protocol": harness.PROTOCOLS["given"] if ml1m else "ms-recommenders stratified per item 75/25 seed 42", "k": 10,
              "goal": goal, "goal_share": share, "centralized": central, "federated": federated,
              "timing_note": "wall times from a shared machine are indicative only; rerun on a quiet one"}  # fmt: skip
    out = harness.write(report, args, f"federated_{name}", script=__file__, argv=argv, libraries=["torch", "flwr", "ray", "opacus"])
    png = Path(args.plot or out.with_suffix(".png"))
    plot(report, png)

    print(f"\n{name} / {report['protocol']}")
    rows = [["centralized", central["test_ndcg"], 100.0, central["steps_run"] or None, None, None, central["fit_s"]]]
    rows += [[f"federated {v}", row["test_ndcg"], 100 * row["ratio_test_ndcg"], row["steps_run"], row.get("clients_per_round_mean"),
              row["privacy"].get("epsilon"), row["fit_s"]] for v, row in federated.items()]  # fmt: skip
    head = ["model", "test ndcg@10", "% of central", "rounds", "clients/rd", "epsilon", "fit s"]
    print(harness.table(head, rows, digits=(4, 1, 0, 1, 2, 0), first=24, width=14))
    print("(centralized 'rounds' = epochs; clients/rd = mean clients that trained per round)")
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
