"""Privacy-utility curve of user-level DP-SGD, and the membership-inference audit of every run.

    python benchmarks/privacy.py --data ml100k                       # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/privacy.py --data ml100k --epsilons 1,8,inf    # a subset
    python benchmarks/privacy.py --data ml100k --federated-run RUN_ID --federated-tracking-uri sqlite:///mlflow.db
    python benchmarks/privacy.py --data synthetic --set trainer.epochs=5

For each epsilon: trains configs/two_tower_ml100k_dp.yaml with privacy.target_epsilon=eps
(inf: the non-private configs/two_tower_ml100k.yaml), every run with the same seeded audit
holdout (privacy.audit_holdout, default 0.2 of the users: the audit's non-members, kept out of
train/val/test), reports test NDCG@10 (MS protocol) and its share of the non-private NDCG@10,
then audits the run (`trustrec audit privacy`: loss and calibrated attacks, ROC AUC with a
bootstrap CI). A federated run trained elsewhere can be added to the audit table with
--federated-run (it must have been trained with the same privacy.audit_holdout).

Prints a table, writes JSON and a PNG (default benchmarks/results/privacy_<data>.{json,png}) and
keeps the runs in an MLflow sqlite store under --workdir (default runs/privacy_bench) for
`make mlflow-ui`. Exit status 2 when ML-100k is asked for but absent.
Goals: NDCG@10 >= 85 % of non-private at eps=8 and >= 60 % at eps=1; audit AUC <= 0.55 at eps <= 8.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from harness import REPO  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402

CONFIGS = {
    "ml100k": (REPO / "configs" / "two_tower_ml100k.yaml", REPO / "configs" / "two_tower_ml100k_dp.yaml"),
    "synthetic": (REPO / "configs" / "two_tower.yaml", REPO / "configs" / "two_tower_dp.yaml"),
}
GOALS = {8.0: 0.85, 1.0: 0.60}  # share of the non-private NDCG@10
AUC_GOAL, AUC_GOAL_EPS = 0.55, 8.0


def run_one(config: Path, overrides: list[str], audit: bool, n_boot: int) -> dict:
    from training.pipeline import train
    from training.privacy.audit import audit_run

    cfg = load_config(config, overrides)
    started = time.perf_counter()
    result = train(cfg)
    row = {
        "run_id": result.run_id,
        "privacy": result.fit.privacy or {"mode": "none"},
        "ndcg": result.metrics[f"test/ndcg@{cfg.task.eval_k}"],
        "popularity_ndcg": result.metrics[f"baseline/popularity/ndcg@{cfg.task.eval_k}"],
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    if audit:
        row["audit"] = audit_result(audit_run(result.run_id, cfg.tracking.tracking_uri, out=Path(cfg.export.output_dir).parent / f"audit-{result.run_id}", n_boot=n_boot))
    return row


def audit_result(a) -> dict:
    return {name: {"auc": r.auc, "ci_low": r.ci_low, "ci_high": r.ci_high, "tpr_at_1pct_fpr": r.tpr_at_1pct_fpr} for name, r in a.results.items()} | {
        "n_members": a.n_members, "n_non_members": a.n_non_members}  # fmt: skip


def plot(path: Path, rows: list[dict], base: float, pop: float, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted((r for r in rows if r["privacy"].get("mode") == "dp"), key=lambda r: r["privacy"]["epsilon"])
    eps = [r["privacy"]["epsilon"] for r in dp]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    left.plot(eps, [r["ndcg"] for r in dp], "o-", label="DP-SGD (user level)")
    left.axhline(base, c="k", lw=1, label=f"non-private {base:.3f}")
    left.axhline(pop, c="grey", ls=":", lw=1, label=f"popularity {pop:.3f}")
    for e, share in GOALS.items():
        left.plot([e], [share * base], "r_", ms=18, mew=2)
    left.plot([], [], "r_", ms=10, mew=2, label="goals (85 % at eps 8, 60 % at eps 1)")
    left.set(xscale="log", xlabel="epsilon (delta = 1/users)", ylabel=f"test NDCG@{k}", title="privacy-utility")
    left.legend(fontsize=8)
    audited = sorted((r for r in rows if "audit" in r), key=lambda r: r["privacy"].get("epsilon", math.inf))
    if audited:
        labels = [r["label"] for r in audited]
        x = range(len(audited))
        for shift, attack in ((-0.12, "loss"), (0.12, "calibrated")):
            auc = [r["audit"][attack]["auc"] for r in audited]
            err = [[a - r["audit"][attack]["ci_low"] for a, r in zip(auc, audited)], [r["audit"][attack]["ci_high"] - a for a, r in zip(auc, audited)]]
            right.errorbar([i + shift for i in x], auc, yerr=err, fmt="o", capsize=3, label=f"{attack} attack (95 % CI)")
        right.axhline(0.5, c="grey", ls="--", lw=1, label="chance")
        right.axhline(AUC_GOAL, c="r", lw=1, label=f"goal <= {AUC_GOAL} at eps <= {AUC_GOAL_EPS:g}")
        right.set_xticks(list(x), labels, rotation=30, fontsize=8)
        right.set(ylabel="membership-inference ROC AUC", title="audit: members vs held-out users")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "privacy_<data>")  # the PNG goes beside the JSON
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--epsilons", default="inf,8,1,4,2,0.5", help="target epsilons, run in this order; inf = non-private (default inf,8,1,4,2,0.5: the goals first)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    p.add_argument("--dp-set", action="append", default=[], metavar="KEY=VALUE", help="override for the DP runs only (repeatable)")
    p.add_argument("--audit-holdout", type=float, default=0.2, help="share of users held out as the audit's non-members (default 0.2)")
    p.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CI (default 1000)")
    p.add_argument("--federated-run", help="MLflow run id of a federated run to add to the audit table")
    p.add_argument("--federated-tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--workdir", default=str(REPO / "runs" / "privacy_bench"), help="MLflow store, bundles and audits of the runs")
    args = p.parse_args(argv)
    epsilons = list(dict.fromkeys(harness.numbers(p, "--epsilons", args.epsilons, float)))  # in the order given
    source = harness.dataset(p, args.data, list(CONFIGS))
    if source is None:
        return 2
    name, data = source.name, source.overrides
    base_config, dp_config = CONFIGS[name]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    def overrides(tag: str) -> list[str]:
        return [*data, f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "tracking.experiment=privacy_bench", f"tracking.run_name={name}-{tag}",
                "tracking.register_model=false", "store.load=false", "trainer.progress=false", f"export.output_dir={work}/{name}-{tag}/bundle",
                f"trainer.checkpoint_dir={work}/{name}-{tag}/ckpt", f"privacy.audit_holdout={args.audit_holdout}", *args.set]  # fmt: skip

    rows: list[dict] = []
    started = time.perf_counter()
    k = 10

    def write(final: bool = False) -> dict:
        """JSON + PNG of the rows so far (after every run: a long sweep that stops keeps its results;
        --record records the final one only)."""
        base = next((r["ndcg"] for r in rows if r["privacy"].get("mode") == "none" and "ndcg" in r), None)
        pop = next((r["popularity_ndcg"] for r in rows if "popularity_ndcg" in r), float("nan"))
        for r in rows:
            if base and "ndcg" in r:
                r["share_of_nonprivate"] = r["ndcg"] / base
        goals = {}
        for eps, share in GOALS.items():
            hit = next((r for r in rows if r.get("target_epsilon") == eps), None)
            if hit and base:
                goals[f"ndcg_share_at_eps_{eps:g}"] = {"goal": share, "value": round(hit["share_of_nonprivate"], 4), "met": hit["share_of_nonprivate"] >= share}
        audited_dp = [r for r in rows if "audit" in r and r["privacy"].get("mode") == "dp" and r["privacy"]["epsilon"] <= AUC_GOAL_EPS + 1e-6]
        if audited_dp:
            worst = max(max(r["audit"]["loss"]["auc"], r["audit"]["calibrated"]["auc"]) for r in audited_dp)
            goals["audit_auc_at_eps_le_8"] = {"goal": AUC_GOAL, "value": round(worst, 4), "met": worst <= AUC_GOAL}
        report = {
            "dataset": name,
            "configs": {"nonprivate": str(base_config.relative_to(REPO)), "dp": str(dp_config.relative_to(REPO))},
            "overrides": [o for o in overrides("x") if not o.startswith(("data.path=", "tracking.", "export.", "trainer.checkpoint_dir="))] + args.dp_set,
            "k": k,
            "rows": rows,
            "popularity_ndcg": pop,
            "goals": goals,
            "seconds": round(time.perf_counter() - started, 1),
        }
        report["out"] = harness.write(report, args, f"privacy_{name}", script=__file__, argv=argv, libraries=["torch", "opacus"], record=final and args.record)
        plot(report["out"].with_suffix(".png"), rows, base or float("nan"), pop, k)
        return report

    try:
        for eps in epsilons:
            tag = "nonprivate" if math.isinf(eps) else f"eps{eps:g}"
            if math.isinf(eps):
                row = run_one(base_config, overrides(tag), not args.no_audit, args.bootstrap)
            else:
                row = run_one(dp_config, overrides(tag) + [f"privacy.target_epsilon={eps}", *args.dp_set], not args.no_audit, args.bootstrap)
            row.update(target_epsilon=eps, label="non-private" if math.isinf(eps) else f"DP eps={eps:g}")
            rows.append(row)
            write()
            print(f"  {row['label']}: NDCG {row['ndcg']:.4f}" + (f", audit AUC {row['audit']['calibrated']['auc']:.3f}" if "audit" in row else ""), flush=True)
    except ConfigError as e:
        print(f"privacy: error: {e}", file=sys.stderr)
        return 2
    if args.federated_run:
        from training.privacy.audit import audit_run

        fed = audit_run(args.federated_run, args.federated_tracking_uri, out=work / f"audit-{args.federated_run}", n_boot=args.bootstrap)
        rows.append({"label": "federated", "run_id": args.federated_run, "privacy": fed.privacy, "target_epsilon": None, "audit": audit_result(fed)})
    report = write(final=True)
    goals, pop, seconds, out = report["goals"], report["popularity_ndcg"], report["seconds"], report["out"]
    png = out.with_suffix(".png")

    print(f"\n{name}: user-level DP-SGD privacy-utility and membership-inference audit  ({seconds:.0f} s)")
    print(f"  {'run':<16}{'eps':>7}{'sigma':>8}{'q':>7}{'steps':>6}{f'NDCG@{k}':>9}{'share':>7}   {'AUC loss [95% CI]':<24}{'AUC calibrated [95% CI]':<24}")
    for r in rows:
        pr = r["privacy"]
        dp = pr.get("mode") == "dp"
        cells = f"{pr['epsilon']:>7.2f}{pr['noise_multiplier']:>8.3f}{pr['sample_rate']:>7.3f}{pr['steps']:>6d}" if dp else f"{'inf':>7}{'-':>8}{'-':>7}{'-':>6}"
        util = f"{r['ndcg']:>9.4f}{r.get('share_of_nonprivate', float('nan')):>7.0%}" if "ndcg" in r else f"{'-':>9}{'-':>7}"
        aud = "".join(f"   {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]   " for a in (r["audit"]["loss"], r["audit"]["calibrated"])) if "audit" in r else ""
        print(f"  {r['label']:<16}{cells}{util}{aud}")
    print(f"  popularity baseline NDCG@{k}: {pop:.4f}")
    for key, g in goals.items():
        print(f"  goal {key}: {g['value']} vs {g['goal']} -> {'met' if g['met'] else 'MISSED'}")
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
