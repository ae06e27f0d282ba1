"""The statistics of a user-randomized experiment: per-arm ratio metrics with confidence intervals,
lift against control, a sample-ratio-mismatch test and guardrails. Numpy and scipy only.

Unit of randomization and analysis: the user. An exposure is one served list; a user's totals are
their exposures, shown items and clicks. CTR is a *ratio metric*: per arm,

    CTR = sum_u clicks_u / sum_u shown_u = mean(X) / mean(Y),     X = clicks_u, Y = shown_u,

whose per-exposure observations are not independent (one user's clicks correlate), so its variance is
taken over users by the delta method (Deng, Knoblich & Lu 2018, "Applying the Delta Method in Metric
Analytics: A Practical Guide with Novel Ideas", KDD; eq. for the ratio of two means):

    Var(mean(X)/mean(Y)) ≈ (1/n) [ s_X²/Ȳ² − 2 X̄ s_XY/Ȳ³ + X̄² s_Y²/Ȳ⁴ ]

computed here as var(ψ)/n with the influence values ψ_u = (X_u − R·Y_u)/Ȳ (the same quantity,
sample moments with ddof 1). Conversion is the share of users with at least one click (a mean: the
ratio with Y_u = 1). Intervals are normal, value ± z_{1−α/2}·se; `method="bootstrap"` gives
percentile intervals from resampling users with replacement within each arm (Efron & Tibshirani 1993).

Lift of treatment t against control c (independent arms):

    absolute  Δ = R_t − R_c,        Var = Var(R_t) + Var(R_c)
    relative  ρ = R_t / R_c − 1,    Var ≈ Var(R_t)/R_c² + R_t² Var(R_c)/R_c⁴    (delta method on the
                                                                                   ratio of means; Deng et al. 2018, §3)

Sample ratio mismatch: Pearson's χ² of the users assigned per arm against the configured weights
(scipy.stats.chisquare); flagged below p = 0.001 (a strict threshold, as SRM checks run on every
experiment: Fabijan et al. 2019, "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from training import beyond

ALPHA = 0.05
SRM_THRESHOLD = 0.001
N_BOOT = 2000
_BOOT_CHUNK = 200


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(sps.norm.ppf(1.0 - alpha / 2.0))


def _vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per user), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and (1 − alpha) confidence interval."""

    value: float
    se: float
    low: float
    high: float
    n: int  # units (users) behind it
    method: str  # "delta" or "bootstrap"

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Lift:
    absolute: Interval  # R_t − R_c
    relative: Interval  # R_t / R_c − 1

    def to_dict(self) -> dict:
        return {"absolute": self.absolute.to_dict(), "relative": self.relative.to_dict()}


def _units(num: Any, den: Any | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = _vector(num, f"{name} numerator")
    y = np.ones_like(x) if den is None else _vector(den, f"{name} denominator")
    if len(x) != len(y):
        raise ValueError(f"{name}: numerator ({len(x)}) and denominator ({len(y)}) need one value per user each")
    if len(x) < 2:
        raise ValueError(f"{name}: at least 2 users are needed for a variance, got {len(x)}")
    if (y < 0).any() or y.sum() <= 0:
        raise ValueError(f"{name} denominator must be >= 0 with a positive sum")
    return x, y


def _delta(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(R, Var R) of R = mean(x)/mean(y) by the delta method (module docstring)."""
    r = x.sum() / y.sum()
    psi = (x - r * y) / y.mean()
    return float(r), float(psi.var(ddof=1) / len(x))


def _boot(x: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of sum(x)/sum(y), resampling users with replacement: (n_boot,)."""
    out = np.empty(n_boot)
    for lo in range(0, n_boot, _BOOT_CHUNK):
        idx = rng.integers(0, len(x), size=(min(_BOOT_CHUNK, n_boot - lo), len(x)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + len(idx)] = x[idx].sum(axis=1) / y[idx].sum(axis=1)
    return out


def _percentile(value: float, reps: np.ndarray, alpha: float, n: int) -> Interval:
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval(float(value), float(reps.std(ddof=1)), float(lo), float(hi), n, "bootstrap")


def _check_method(method: str, n_boot: int) -> None:
    if method not in ("delta", "bootstrap"):
        raise ValueError(f"method must be 'delta' or 'bootstrap', got {method!r}")
    if method == "bootstrap" and n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")


def ratio(num: Any, den: Any | None = None, *, alpha: float = ALPHA, method: str = "delta", n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """sum(num) / sum(den) over users with its CI (den None: the mean of num, e.g. conversion).

    `num`, `den`: one value per user (clicks_u, shown_u). Delta method (Deng et al. 2018) or
    percentile bootstrap over users (`method="bootstrap"`, `n_boot` replicates, seeded)."""
    _check_method(method, n_boot)
    z = _z(alpha)
    x, y = _units(num, den, "ratio")
    r, var = _delta(x, y)
    if method == "bootstrap":
        return _percentile(r, _boot(x, y, n_boot, np.random.default_rng(seed)), alpha, len(x))
    se = math.sqrt(var)
    return Interval(r, se, r - z * se, r + z * se, len(x), "delta")


def lift(
    treatment: tuple[Any, Any | None],
    control: tuple[Any, Any | None],
    *,
    alpha: float = ALPHA,
    method: str = "delta",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Lift:
    """Absolute and relative lift of a ratio metric, treatment vs control, with CIs.

    `treatment`, `control`: (num, den) per-user arrays of each arm (den None for a mean). Delta
    method (module docstring) or a bootstrap resampling users within each arm independently."""
    _check_method(method, n_boot)
    z = _z(alpha)
    xt, yt = _units(*treatment, "treatment")
    xc, yc = _units(*control, "control")
    rt, vt = _delta(xt, yt)
    rc, vc = _delta(xc, yc)
    if rc == 0:
        raise ValueError("control's metric is 0: the relative lift is undefined")
    diff, rel = rt - rc, rt / rc - 1.0
    n = len(xt) + len(xc)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        bt, bc = _boot(xt, yt, n_boot, rng), _boot(xc, yc, n_boot, rng)
        with np.errstate(invalid="ignore", divide="ignore"):
            return Lift(_percentile(diff, bt - bc, alpha, n), _percentile(rel, bt / bc - 1.0, alpha, n))
    se_abs = math.sqrt(vt + vc)
    se_rel = math.sqrt(vt / rc**2 + rt**2 * vc / rc**4)
    return Lift(
        Interval(diff, se_abs, diff - z * se_abs, diff + z * se_abs, n, "delta"),
        Interval(rel, se_rel, rel - z * se_rel, rel + z * se_rel, n, "delta"),
    )


@dataclass(frozen=True)
class SRM:
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    threshold: float
    mismatch: bool  # p_value < threshold

    def to_dict(self) -> dict:
        return asdict(self)


def srm(counts: Mapping[str, int], weights: Mapping[str, float], *, threshold: float = SRM_THRESHOLD) -> SRM:
    """Sample-ratio-mismatch χ² test of the users per arm against the configured traffic weights.

    `counts`: users assigned per arm (every assigned user, including those later left out of the
    metrics, e.g. without consent); `weights`: the configured weights (any scale)."""
    if set(counts) != set(weights) or len(counts) < 2:
        raise ValueError(f"counts and weights must name the same arms (at least 2): {sorted(counts)} vs {sorted(weights)}")
    names = list(weights)
    obs = np.array([counts[a] for a in names], dtype=np.float64)
    w = np.array([weights[a] for a in names], dtype=np.float64)
    if (obs < 0).any() or obs.sum() <= 0:
        raise ValueError(f"counts must be >= 0 with a positive total, got {dict(counts)}")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"weights must be finite and > 0, got {dict(weights)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    exp = obs.sum() * w / w.sum()
    res = sps.chisquare(obs, f_exp=exp)
    p = float(res.pvalue)
    return SRM({a: int(c) for a, c in zip(names, obs)}, {a: float(e) for a, e in zip(names, exp)}, float(res.statistic), p, threshold, p < threshold)


# ---------------------------------------------------------------------- per user and per arm


@dataclass(frozen=True)
class UserTotals:
    """One row per user: arm, exposures, shown items and clicks summed over the user's exposures."""

    user: np.ndarray
    arm: np.ndarray
    exposures: np.ndarray
    shown: np.ndarray
    clicks: np.ndarray


def per_user(users: Sequence, arms: Sequence, shown: Any, clicks: Any) -> UserTotals:
    """Aggregate exposure rows (one per served list: user id, arm, items shown, clicks on it) per user.
    A user logged under two arms breaks stickiness and raises ValueError naming a few of them."""
    u = np.asarray(users)
    a = np.asarray(arms).astype(str)
    s = _vector(shown, "shown")
    c = _vector(clicks, "clicks")
    if not (len(u) == len(a) == len(s) == len(c)):
        raise ValueError(f"users, arms, shown and clicks need one row per exposure: {len(u)}, {len(a)}, {len(s)}, {len(c)}")
    if (s < 0).any() or (c < 0).any() or (c > s).any():
        raise ValueError("shown and clicks must be >= 0 with clicks <= shown per exposure")
    uniq, first, inv = np.unique(u, return_index=True, return_inverse=True)  # first: each user's first exposure
    inv = inv.reshape(-1)
    arm_of = a[first]
    moved = np.flatnonzero(arm_of[inv] != a)
    if moved.size:
        raise ValueError(f"users: {sorted(set(u[moved].tolist()))[:5]} logged under more than one arm (assignment must be sticky)")
    return UserTotals(
        user=uniq,
        arm=arm_of,
        exposures=np.bincount(inv, minlength=len(uniq)),
        shown=np.bincount(inv, weights=s, minlength=len(uniq)),
        clicks=np.bincount(inv, weights=c, minlength=len(uniq)),
    )


def guardrails(lists: Any, n_items: int, item_pop: Any | None = None, item_genres_multi_hot: Any | None = None) -> dict[str, float]:
    """Guardrails of the lists an arm showed (one row per exposure, -1 = empty slot), through
    training.beyond: catalogue coverage and exposure Gini, average recommendation popularity
    (`item_pop`: interactions or users per item) and genre intra-list diversity (`item_genres_multi_hot`)."""
    topk = np.asarray(lists)
    out = {"coverage": beyond.coverage(topk, n_items), "exposure_gini": beyond.exposure_gini(topk, n_items)}
    if item_pop is not None:
        out["popularity"] = beyond.average_popularity(topk, item_pop)
    if item_genres_multi_hot is not None:
        out["diversity"] = beyond.intra_list_diversity_genres(topk, item_genres_multi_hot)
    return out


def report(
    users: Sequence,
    arms: Sequence,
    shown: Any,
    clicks: Any,
    *,
    control: str,
    weights: Mapping[str, float],
    assigned: Mapping[str, int] | None = None,
    lists: Any | None = None,
    n_items: int | None = None,
    item_pop: Any | None = None,
    item_genres_multi_hot: Any | None = None,
    alpha: float = ALPHA,
    method: str = "delta",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Per arm: users, exposures, shown items, clicks, CTR (clicks / shown items), clicks per
    exposure (clicks / lists; both ratio metrics over users) and conversion (share of users with a
    click) with CIs; lift of each arm vs `control`; SRM of
    `assigned` (users assigned per arm; default: users seen in the logs) against `weights`; with
    `lists` (n, k) and `n_items`, guardrails per arm. A JSON-ready dict."""
    if control not in weights:
        raise ValueError(f"control: {control!r} is not one of the arms {sorted(weights)}")
    totals = per_user(users, arms, shown, clicks)
    unknown = sorted(set(totals.arm.tolist()) - set(weights))
    if unknown:
        raise ValueError(f"arms: {unknown} logged but not configured in weights {sorted(weights)}")
    kw = {"alpha": alpha, "method": method, "n_boot": n_boot, "seed": seed}
    per_arm: dict[str, dict] = {}
    metric_of: dict[str, dict[str, tuple]] = {}
    for name in weights:
        m = totals.arm == name
        metric_of[name] = {
            "ctr": (totals.clicks[m], totals.shown[m]),
            "clicks_per_exposure": (totals.clicks[m], totals.exposures[m].astype(np.float64)),
            "conversion": ((totals.clicks[m] > 0).astype(np.float64), None),
        }
        row: dict[str, Any] = {"users": int(m.sum()), "exposures": int(totals.exposures[m].sum()), "shown": int(totals.shown[m].sum()), "clicks": int(totals.clicks[m].sum())}
        if m.sum() >= 2 and totals.shown[m].sum() > 0:
            for metric, units in metric_of[name].items():
                row[metric] = ratio(*units, **kw).to_dict()
        per_arm[name] = row
    for name in weights:
        if name == control:
            continue
        per_arm[name]["lift"] = {}
        for metric in metric_of[name]:
            if metric in per_arm[name] and metric in per_arm[control] and per_arm[control][metric]["value"] > 0:
                per_arm[name]["lift"][metric] = lift(metric_of[name][metric], metric_of[control][metric], **kw).to_dict()
    if lists is not None:
        if n_items is None:
            raise ValueError("n_items is needed with lists (guardrails)")
        topk = np.asarray(lists)
        arm_rows = np.asarray(arms).astype(str)
        if len(topk) != len(arm_rows):
            raise ValueError(f"lists ({len(topk)}) needs one row per exposure ({len(arm_rows)})")
        for name in weights:
            rows = arm_rows == name
            if rows.any():
                per_arm[name]["guardrails"] = guardrails(topk[rows], n_items, item_pop, item_genres_multi_hot)
    counts = dict(assigned) if assigned is not None else {name: per_arm[name]["users"] for name in weights}
    return {"control": control, "alpha": alpha, "method": method, "arms": per_arm, "srm": srm(counts, weights).to_dict()}
