"""`trustrec audit privacy RUN_ID`: membership inference against users.

Members are the run's training users; non-members are the users `privacy.audit_holdout` kept out
of training, validation and test (training/privacy/holdout.py), drawn from the same population.
Every user's *candidates* are the rows the split put in train (for members exactly what the
model was fit on; for non-members what they would have contributed). The attacker holds the
exported bundle (ONNX user tower + item matrix, as served) and a user's candidate items, and asks
"was this user in the training set?":

- `loss`: the user's mean log-likelihood of a hidden share of their items given the rest as
  history (the training objective, full softmax over the catalog at the model's temperature),
  averaged over a few random hide masks. Members should be predicted better.
- `calibrated`: the same minus the log-likelihood of the same items under item popularity over
  the whole population (members and non-members alike, so the reference itself is blind to
  membership). It removes how predictable a user is anyway (a fan of blockbusters scores high
  under any model) — difficulty calibration (Watson et al., 2022), usually the stronger attack.

A DP-EASE bundle (`privacy.mechanism: gram`; manifest `model.spec` = {"kind": "ease", ...}) has no
softmax and no temperature: its scores x_u B are unnormalized regression outputs whose scale moves
with λ, and the recipe's λ = σ·√(2·n_items) grows as ε falls (scores shrink roughly as 1/λ). A
softmax at any fixed temperature would then measure λ rather than membership, and a temperature
fitted on this bundle's members vs non-members would hand the attack the answer it is meant to
find. So for EASE the per-item statistic is rank-based (`statistic="rank"`): the hidden item's
mid-rank r among the n_pool items not in the visible history, scored log(n_pool / r) — the log of the
inverse rank percentile, 0 for the last item, log n_pool for the first. It is invariant to any
strictly increasing transform of a user's scores (no temperature to choose, the same statistic at
every ε), weighs the top of the list (where a memorized training item shows up) far more than a
mean rank would, and is computed the same way for the popularity reference, so `calibrated` stays
the difference of like with like. The attack names (`loss`, `calibrated`) and everything downstream
are unchanged; `Audit.statistic` records which statistic was used.

Reported: ROC AUC with a stratified bootstrap confidence interval and TPR at 1 % FPR per attack.
AUC 0.5 = the attacker cannot tell members from non-members. Logged to the audited MLflow run
(`audit/<attack>/auc`, `..._ci_low`, `..._ci_high`, `tpr_at_1pct_fpr`) with the ROC plot and a
JSON under `audit/`. Works on any run (non-private, DP, federated) whose config held users out.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

ATTACKS = ("loss", "calibrated")


# --------------------------------------------------------------------------- statistics
def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > that of a random non-member), ties counting 1/2 (Mann-Whitney)."""
    from scipy.stats import rankdata

    m, n = len(members), len(non_members)
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs members and non-members, got {m} and {n}")
    ranks = rankdata(np.concatenate([members, non_members]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def bootstrap_ci(members: np.ndarray, non_members: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling members and non-members separately (stratified)."""
    rng = np.random.default_rng(seed)
    aucs = [roc_auc(rng.choice(members, len(members)), rng.choice(non_members, len(non_members))) for _ in range(n_boot)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) for every threshold, from (0, 0) to (1, 1); tied scores move together."""
    scores = np.concatenate([members, non_members])
    label = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    scores, label = scores[order], label[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]  # last index of each tie group
    tpr = np.r_[0.0, np.cumsum(label)[last] / len(members)]
    fpr = np.r_[0.0, np.cumsum(1 - label)[last] / len(non_members)]
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float = 0.01) -> float:
    """Best TPR among thresholds whose FPR is <= `at` (the low-FPR regime that matters for MIA)."""
    return float(tpr[fpr <= at].max())


@dataclass
class AttackResult:
    name: str
    auc: float
    ci_low: float
    ci_high: float
    tpr_at_1pct_fpr: float
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def metrics(self) -> dict[str, float]:
        p = f"audit/{self.name}"
        return {f"{p}/auc": self.auc, f"{p}/auc_ci_low": self.ci_low, f"{p}/auc_ci_high": self.ci_high, f"{p}/tpr_at_1pct_fpr": self.tpr_at_1pct_fpr}


def attack(name: str, members: np.ndarray, non_members: np.ndarray, n_boot: int = 1000, seed: int = 0) -> AttackResult:
    fpr, tpr = roc_curve(members, non_members)
    low, high = bootstrap_ci(members, non_members, n_boot, seed=seed)
    return AttackResult(name, roc_auc(members, non_members), low, high, tpr_at_fpr(fpr, tpr), fpr, tpr)


# --------------------------------------------------------------------------- scores
def log_inverse_rank(scores: np.ndarray, visible: tuple[np.ndarray, np.ndarray], batch: np.ndarray) -> np.ndarray:
    """log(n_pool / r) for every item of each row of `scores` (rows = `batch` users): r is the item's
    mid-rank (ties share the mean rank) among the row's pool, the items not in the user's `visible`
    history (indptr, indices); n_pool the pool's size. Visible items get values too; callers read
    only hidden (pool) items."""
    from scipy.stats import rankdata

    from training.data import gather_rows

    s = np.array(scores, dtype=np.float64, copy=True)
    v_len, v_items = gather_rows(visible, batch)
    s[np.repeat(np.arange(len(batch)), v_len), v_items] = -np.inf  # ranked below every pool item
    ranks = rankdata(-s, axis=1, method="average")  # pool items take ranks 1 .. n_pool
    n_pool = s.shape[1] - np.count_nonzero(np.isneginf(s), axis=1)
    return np.log(np.maximum(n_pool, 1)[:, None] / ranks)


def log_likelihood_scores(
    user_vectors: Callable[[np.ndarray, tuple], np.ndarray],
    item_vec: np.ndarray,
    temperature: float,
    candidates: tuple[np.ndarray, ...],
    users: np.ndarray,
    population_counts: np.ndarray,
    hide: float = 0.3,
    repeats: int = 4,
    seed: int = 0,
    statistic: str = "softmax",
) -> tuple[np.ndarray, np.ndarray]:
    """Per user: (mean model statistic of the hidden items given the rest, the same under popularity),
    averaged over `repeats` random hide masks. `user_vectors(users, history_csr)` runs the user tower.
    statistic "softmax": log p(item) under a full softmax over the catalog at `temperature` (popularity:
    log of the add-one item frequency); "rank": log(n_pool / rank) among the items not visible
    (`log_inverse_rank`; popularity: the same on the population counts; `temperature` unread)."""
    from training.data import csr_from_mask, gather_rows

    if statistic not in ("softmax", "rank"):
        raise ValueError(f"statistic must be softmax or rank, got {statistic!r}")

    rng = np.random.default_rng(seed)
    indptr = candidates[0]
    lengths = np.diff(indptr)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    log_pop = np.log((population_counts + 1.0) / (population_counts + 1.0).sum())
    model_ll, pop_ll = np.zeros(len(users)), np.zeros(len(users))
    for _ in range(repeats):
        hidden = rng.random(indptr[-1]) < hide
        none = (np.bincount(rows[hidden], minlength=len(lengths)) == 0) & (lengths > 0)  # >= 1 target each
        hidden[indptr[:-1][none] + (rng.random(none.sum()) * lengths[none]).astype(np.int64)] = True
        visible, targets = csr_from_mask(candidates, ~hidden), csr_from_mask(candidates, hidden)
        for start in range(0, len(users), 512):
            batch = users[start : start + 512]
            scores = user_vectors(batch, visible).astype(np.float64) @ item_vec.T
            if statistic == "rank":
                log_p = log_inverse_rank(scores, visible, batch)
                pop = log_inverse_rank(np.broadcast_to(population_counts, scores.shape), visible, batch)
            else:
                logits = scores / temperature
                top = logits.max(1, keepdims=True)
                log_p = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
                pop = np.broadcast_to(log_pop, scores.shape)
            t_len, t_items = gather_rows(targets, batch)
            row = np.repeat(np.arange(len(batch)), t_len)
            model_ll[start : start + len(batch)] += np.bincount(row, log_p[row, t_items], len(batch)) / t_len
            pop_ll[start : start + len(batch)] += np.bincount(row, pop[row, t_items], len(batch)) / t_len
    return model_ll / repeats, pop_ll / repeats


@dataclass
class Audit:
    results: dict[str, AttackResult]
    n_members: int
    n_non_members: int
    privacy: dict[str, Any]
    run_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    statistic: str = "softmax"  # the per-item statistic of the attacks (log_likelihood_scores)

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "privacy": self.privacy,
            "statistic": self.statistic,
            "n_members": self.n_members,
            "n_non_members": self.n_non_members,
            "attacks": {name: {k.rsplit("/", 1)[1]: v for k, v in r.metrics().items()} for name, r in self.results.items()},
        }


def audit_bundle(bundle: Path, cfg, n_boot: int = 1000, repeats: int = 4, seed: int = 0) -> Audit:
    """Both attacks against the exported model in `bundle`, on the members / non-members that the
    training config `cfg` implies (its data, split and privacy.audit_holdout)."""
    from features.datasets import load_dataset
    from features.splits import split
    from bundle.load import open_bundle
    from training.data import rated_csr, user_feed
    from training.model import TowerSpec
    from training.pipeline import context
    from training.privacy.holdout import holdout_mask

    p = cfg.privacy
    if p.audit_holdout <= 0:
        raise ValueError("privacy.audit_holdout: the run held no users out (0), so there are no non-members to audit against; train with e.g. --set privacy.audit_holdout=0.2")
    opened = open_bundle(bundle, force_cpu=True)  # manifest schema checked, ONNX session, item matrix
    manifest = opened.manifest
    raw = manifest["model"]["spec"]
    ease = raw.get("kind") == "ease"  # DP-EASE (training/privacy/gram.py): a history bag, no temperature
    spec = SimpleNamespace(n_users=raw["n_users"], n_items=raw["n_items"]) if ease else TowerSpec(**raw)
    ds = load_dataset(cfg.data)
    if (spec.n_users, spec.n_items) != (ds.n_users, ds.n_items):
        raise ValueError(f"model has {spec.n_users} users / {spec.n_items} items, the config's data has {ds.n_users} / {ds.n_items}")
    candidates = rated_csr(split(ds.interactions, cfg.split).train, ds.n_users)
    has = np.diff(candidates[0]) > 0
    held = holdout_mask(ds.n_users, p.audit_holdout, p.audit_seed)
    members, non_members = np.flatnonzero(has & ~held), np.flatnonzero(has & held)
    if len(non_members) < 2 or len(members) < 2:
        raise ValueError(f"privacy.audit_holdout: {len(members)} members and {len(non_members)} non-members with data; need at least 2 of each")
    item_vec = opened.item_vectors.astype(np.float64)
    ctx = context(cfg, ds)

    def user_vectors(users: np.ndarray, history: tuple) -> np.ndarray:
        if ease:  # binary bag (each item once), as the bundle was exported; user_feed reads no spec field
            history = (history[0], history[1])
        return opened.user_vectors(user_feed(spec, ctx, users, history))

    population = np.bincount(candidates[1], minlength=ds.n_items).astype(np.float64)
    users = np.concatenate([members, non_members])
    statistic = "rank" if ease else "softmax"
    temperature = 1.0 if ease else spec.temperature
    model_ll, pop_ll = log_likelihood_scores(user_vectors, item_vec, temperature, candidates, users, population, cfg.task.history_dropout, repeats, seed, statistic)
    scores = {"loss": model_ll, "calibrated": model_ll - pop_ll}
    m = len(members)
    results = {name: attack(name, s[:m], s[m:], n_boot, seed) for name, s in scores.items()}
    privacy = manifest.get("provenance", {}).get("privacy", {"mode": "unknown"})
    return Audit(results, m, len(non_members), privacy, statistic=statistic)


# --------------------------------------------------------------------------- report
def plot_roc(path: Path, audit: Audit, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance (AUC 0.5)")
    for r in audit.results.values():
        ax.plot(r.fpr, r.tpr, lw=1.5, label=f"{r.name}: AUC {r.auc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    ax.set(xlabel="false positive rate (non-members called members)", ylabel="true positive rate (members found)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def describe(privacy: dict[str, Any]) -> str:
    mode = privacy.get("mode", "unknown")
    name = {"dp": "DP-SGD", "none": "non-private"}.get(mode, mode)
    if mode == "dp" and "gram" in str(privacy.get("mechanism", "")):  # training/privacy/gram.py's release
        name = "DP-EASE"
    if "epsilon" in privacy and "delta" in privacy:  # DP-SGD, or federated with client-level DP
        return f"{name} eps={privacy['epsilon']:.2f} delta={privacy['delta']:.2g}"
    return name


def audit_run(run_id: str, tracking_uri: str = "sqlite:///mlflow.db", out: str | Path | None = None, n_boot: int = 1000,
              repeats: int = 4, seed: int = 0, log_to_mlflow: bool = True) -> Audit:  # fmt: skip
    """Audit an MLflow run's exported model; write roc.png + audit.json under `out` (default
    reports/<run_id>/audit) and log metrics and files to the run."""
    from training.report import _client, fetch_run, load_run_bundle, load_run_config

    client = _client(tracking_uri)
    run_id = fetch_run(client, run_id).info.run_id
    out_dir = Path(out) if out is not None else Path("reports") / run_id / "audit"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trustrec-audit-") as tmp:
        cfg = load_run_config(client, run_id, Path(tmp))
        bundle = load_run_bundle(client, run_id, Path(tmp))
        result = audit_bundle(bundle, cfg, n_boot, repeats, seed)
    result.run_id = run_id
    result.files = {"roc": out_dir / "roc.png", "json": out_dir / "audit.json"}
    plot_roc(result.files["roc"], result, f"membership inference: {describe(result.privacy)}")
    summary = result.summary()
    tmp_json = result.files["json"].with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(summary, indent=2))
    tmp_json.replace(result.files["json"])
    if log_to_mlflow:
        from mlflow.entities import Metric

        from training.tracking import mlflow_key

        now = int(time.time() * 1000)
        numbers = {k: v for r in result.results.values() for k, v in r.metrics().items()}
        numbers.update({"audit/n_members": result.n_members, "audit/n_non_members": result.n_non_members})
        client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, 0) for k, v in numbers.items()])
        for path in result.files.values():
            client.log_artifact(run_id, str(path), "audit")
    return result


def format_table(result: Audit) -> str:
    lines = [f"membership inference on run {result.run_id} ({describe(result.privacy)}): {result.n_members} members, {result.n_non_members} non-members",
             f"  {'attack':<11} {'AUC':>6}  {'95% CI':<15} {'TPR@1%FPR':>9}"]  # fmt: skip
    for r in result.results.values():
        lines.append(f"  {r.name:<11} {r.auc:>6.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]  {r.tpr_at_1pct_fpr:>9.3f}")
    lines.append("  (AUC 0.5: members and non-members look alike to the attacker)")
    return "\n".join(lines)
