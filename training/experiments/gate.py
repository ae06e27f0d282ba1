"""The promotion gate: may the model an experiment arm served replace the one another arm served?

`trustrec promote RUN_ID --gate-experiment NAME` asks it before moving the alias. The gate passes
only when, on the experiment's log (intent-to-treat, training/experiments/report.py's arrays):

- the sample ratio is sound (no SRM: with a broken split no lift can be trusted);
- the candidate arm's CTR beats the incumbent arm's with the 95 % CI of the relative lift entirely
  above zero (delta method over users, training/experiments/stats.py `lift`);
- no guardrail regresses by more than GUARDRAIL_TOLERANCE relative to the incumbent: catalog
  coverage and genre diversity must not fall, exposure concentration (Gini) and popularity bias
  (mean popularity of the shown items) must not rise.

Whatever the decision, its evidence (the lift with its CI, the SRM p-value, each guardrail pair)
is returned for the audit log and the model version's tags, so a refused promotion is as visible
as an accepted one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from features.experiments import ExperimentConfig
from training.experiments.report import gather
from training.experiments.stats import guardrails, lift, per_user, srm

GUARDRAIL_TOLERANCE = 0.05  # a guardrail may move 5 % the wrong way: coverage and diversity are noisy at small samples
HIGHER_IS_BETTER = {"coverage": True, "diversity": True, "exposure_gini": False, "popularity": False}


def decide(store, cfg: ExperimentConfig, candidate: str, incumbent: str) -> dict[str, Any]:
    """The gate's decision and evidence for arm `candidate` replacing arm `incumbent`."""
    names = [a.name for a in cfg.arms]
    for flag, arm in (("--gate-arm", candidate), ("--against-arm", incumbent)):
        if arm not in names:
            raise ValueError(f"{flag}: {arm!r} is not an arm of experiment {cfg.name!r} ({', '.join(names)})")
    if candidate == incumbent:
        raise ValueError("--gate-arm and --against-arm name the same arm")
    g = gather(store, cfg)
    if not g["users"]:
        raise ValueError(f"experiment {cfg.name!r}: no exposure logged yet: nothing to gate on")
    totals = per_user(g["users"], g["arms"], g["shown"], g["clicks"])
    units = {a: (totals.clicks[totals.arm == a], totals.shown[totals.arm == a]) for a in (candidate, incumbent)}
    if min(len(u[0]) for u in units.values()) < 2:
        raise ValueError(f"experiment {cfg.name!r}: arms {candidate!r} and {incumbent!r} need at least 2 users each")
    ctr_lift = lift(units[candidate], units[incumbent]).to_dict()
    weights = {a.name: a.weight for a in cfg.arms}
    split = srm({a: g["assigned"].get(a, 0) for a in weights}, weights).to_dict()
    arms = np.asarray(g["arms"])
    guards = {}
    for name in (candidate, incumbent):
        rows = arms == name
        guards[name] = guardrails(g["lists"][rows], max(g["n_items"], 1), g["item_pop"], g["item_genres"])  # -1: an empty slot
    regressions = []
    for key, cand in guards[candidate].items():
        inc = guards[incumbent].get(key)
        if inc is None or key not in HIGHER_IS_BETTER or not np.isfinite(cand) or not np.isfinite(inc):
            continue
        worse = cand < inc * (1 - GUARDRAIL_TOLERANCE) if HIGHER_IS_BETTER[key] else cand > inc * (1 + GUARDRAIL_TOLERANCE) + 1e-12
        if worse:
            regressions.append(key)
    reasons = []
    if split["mismatch"]:
        reasons.append(f"sample ratio mismatch (p = {split['p_value']:.2g})")
    if not ctr_lift["relative"]["low"] > 0:
        rel = ctr_lift["relative"]
        reasons.append(f"CTR lift {100 * rel['value']:+.2f} % [{100 * rel['low']:+.2f}, {100 * rel['high']:+.2f}] does not exclude zero from above")
    if regressions:
        reasons.append("guardrail regression: " + ", ".join(regressions))
    return {
        "experiment": cfg.name, "candidate_arm": candidate, "incumbent_arm": incumbent, "passed": not reasons, "reasons": reasons,
        "ctr_lift": ctr_lift, "srm_p_value": split["p_value"], "guardrails": guards, "tolerance": GUARDRAIL_TOLERANCE,
    }  # fmt: skip


def version_tags(decision: dict[str, Any]) -> dict[str, str]:
    """What the model version carries afterwards (MLflow tag values are strings)."""
    rel = decision["ctr_lift"]["relative"]
    return {
        "gate.experiment": decision["experiment"],
        "gate.decision": "passed" if decision["passed"] else "refused",
        "gate.ctr_lift_relative": f"{rel['value']:+.4f} [{rel['low']:+.4f}, {rel['high']:+.4f}]",
        "gate.srm_p_value": f"{decision['srm_p_value']:.4g}",
        "gate.against_arm": decision["incumbent_arm"],
        "gate.reasons": "; ".join(decision["reasons"]) or "none",
    }
