"""Off-policy evaluation of a ranking policy on logged exposures, at the item-position level.

The log: n served lists (exposures), each k slots. `logged[r, j]` is the item shown at position j of
list r (-1: empty slot), `clicks[r, j]` its click (0/1, or a non-negative reward), `propensities[r, j]`
its exact marginal probability mu(item at j) under the logging policy (bundle/policy.py: the
epsilon-mixture of the logging model's top-k and a uniform k-permutation of its top-N pool). The
candidate ("target") policy is deterministic: `target[r, j]` is the item it would show at position j
for list r's request (-1: it shows nothing there).

Click model assumed: a click depends on the user (context), the item and its position only, not on
the other items in the list (item-position / position-based model: Li, Kim & Zitouni 2018, "Offline
Evaluation of Ranking Policies with Click Models", KDD, §4). The value of the target is its expected
clicks per list V = E[sum_j c(target_j, j)], and its CTR per shown item V / E[|target|]. With the
weight of a logged slot w_rj = [logged_rj == target_rj] / mu_rj (the target's probability of that
item at that position, 1 or 0, over the logging policy's):

    IPS     V = (1/n) sum_r sum_j w_rj c_rj                                  (Horvitz-Thompson; Li et al. 2018, item-position model)
    SNIPS   V = sum_j f_j * (sum_r w_rj c_rj) / (sum_r w_rj)                 (self-normalized per position:
            f_j = share of lists whose target has an item at j;              Swaminathan & Joachims 2015)
    DR      V = (1/n) sum_r sum_j [ q̂(target_rj, j) + w_rj (c_rj - q̂(target_rj, j)) ]   (Dudík, Langford & Li 2011)
    Replay  on the explored lists only (the uniformly random branch, Li, Chu, Langford & Wang 2011):
            V = sum_j f_j * (sum_r m_rj c_rj) / (sum_r m_rj),   m_rj = [logged_rj == target_rj]

(in DR the reward model's value of the *logged* item enters only where w > 0, i.e. where it is the
target's item, so q̂ is needed for the target's items only: `q_target`). IPS and DR are unbiased when
every target item lies in the logging policy's support (mu > 0; `support`), SNIPS and Replay
consistent; outside the support no estimator sees the item and all of them undercount it. Replay's
matches are unbiased only if the random branch draws from pools of one size N for every list (each
target item then matches with probability 1/N whatever the user); IPS reweights any N exactly.

Confidence intervals are normal over lists (the exposure is the unit; clicks within a list are not
independent): IPS and DR by the standard error of the per-list terms; SNIPS and Replay by the delta
method on their sum of ratios, var = var(psi)/n with psi_r = sum_j f_j (a_rj - R_j b_rj) / mean(b_j)
(Deng et al. 2018 for the ratio of means). The CTR interval is the value's divided by the mean target
length. Numpy only (bundle.policy for propensities of target items).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from bundle.policy import propensity as policy_propensity

ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """A target policy's estimated expected clicks per list and CTR per shown item, with CIs."""

    estimator: str
    clicks_per_list: float
    se: float
    low: float
    high: float
    ctr: float  # clicks_per_list / mean target length
    ctr_low: float
    ctr_high: float
    n: int  # lists the estimate used
    alpha: float

    def covers(self, clicks_per_list: float) -> bool:
        return self.low <= clicks_per_list <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- validation


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(sps.norm.ppf(1.0 - alpha / 2.0))


def _items(a: Any, name: str) -> np.ndarray:
    x = np.asarray(a)
    if x.ndim != 2 or (x.size and not np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a 2-D integer array (lists, positions), got shape {x.shape} dtype {x.dtype}")
    x = x.astype(np.int64, copy=False)
    if x.size and x.min() < -1:
        raise ValueError(f"{name} holds negative item indices other than -1 (an empty slot)")
    return x


def _floats(a: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (like logged), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


@dataclass(frozen=True)
class _Log:
    logged: np.ndarray  # (n, k)
    clicks: np.ndarray  # (n, k), 0 at empty slots
    target: np.ndarray  # (n, k), padded with -1 to the log's width
    mu: np.ndarray | None  # (n, k), 1 at empty slots (never used there)


def _log(logged: Any, clicks: Any, target: Any, propensities: Any | None = None) -> _Log:
    lg = _items(logged, "logged")
    n, k = lg.shape
    if n < 2:
        raise ValueError(f"logged: at least 2 lists are needed for a confidence interval, got {n}")
    c = _floats(clicks, "clicks", lg.shape)
    shown = lg >= 0
    if (c < 0).any():
        raise ValueError("clicks must be >= 0")
    if (c[~shown] != 0).any():
        raise ValueError("clicks: a click on an empty slot (logged -1)")
    t = _items(target, "target")
    if t.shape[0] != n or t.shape[1] > k:
        raise ValueError(f"target must have one row per logged list ({n}) and at most the log's {k} positions, got shape {t.shape}")
    if t.shape[1] < k:
        t = np.hstack([t, np.full((n, k - t.shape[1]), -1, dtype=np.int64)])
    mu = None
    if propensities is not None:
        mu = _floats(propensities, "propensities", lg.shape)
        if ((mu[shown] <= 0) | (mu[shown] > 1)).any():
            raise ValueError("propensities of shown items must be in (0, 1]: a shown item had probability > 0 of being shown")
        mu = np.where(shown, mu, 1.0)
    return _Log(lg, c, t, mu)


def _estimate(name: str, value: float, se: float, n: int, mean_len: float, alpha: float) -> Estimate:
    z = _z(alpha)
    lo, hi = value - z * se, value + z * se
    if mean_len <= 0:
        raise ValueError("target: the target shows no item in these lists; its CTR per shown item is undefined")
    return Estimate(name, value, se, lo, hi, value / mean_len, lo / mean_len, hi / mean_len, n, alpha)


def _mean_se(y: np.ndarray) -> tuple[float, float]:
    return float(y.mean()), float(y.std(ddof=1) / math.sqrt(len(y)))


def _sum_of_ratios(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    """V = sum_j f_j * sum_r a_rj / sum_r b_rj and its delta-method SE over rows r (module docstring).
    NaN when a position the target fills (f_j > 0) has no weight at all (sum_r b_rj == 0)."""
    n = len(a)
    a_mean, b_mean = a.mean(axis=0), b.mean(axis=0)
    used = f > 0
    if (b_mean[used] <= 0).any():
        return float("nan"), float("nan")
    r = np.divide(a_mean, b_mean, out=np.zeros_like(a_mean), where=used)
    value = float((f * r).sum())
    safe = np.where(used, b_mean, 1.0)
    psi = ((f / safe)[None, :] * (a - r[None, :] * b)).sum(axis=1)
    return value, float(psi.std(ddof=1) / math.sqrt(n))


def weights(logged: Any, propensities: Any, target: Any) -> np.ndarray:
    """w_rj = [logged_rj == target_rj] / mu_rj, (n, k): the deterministic target's probability of the
    logged item at its position over the logging policy's (0 at empty slots)."""
    lg = _log(logged, np.zeros(np.shape(logged)), target, propensities)
    return _w(lg)


def _w(lg: _Log) -> np.ndarray:
    match = (lg.logged == lg.target) & (lg.target >= 0)
    return np.where(match, 1.0 / lg.mu, 0.0)


def _f(target: np.ndarray) -> np.ndarray:
    return (target >= 0).mean(axis=0)


# ---------------------------------------------------------------------- estimators


def ips(logged: Any, clicks: Any, propensities: Any, target: Any, *, alpha: float = ALPHA) -> Estimate:
    """Item-position inverse propensity scoring (module docstring); CI normal over lists."""
    lg = _log(logged, clicks, target, propensities)
    value, se = _mean_se((_w(lg) * lg.clicks).sum(axis=1))
    return _estimate("ips", value, se, len(lg.logged), float((lg.target >= 0).sum(axis=1).mean()), alpha)


def snips(logged: Any, clicks: Any, propensities: Any, target: Any, *, alpha: float = ALPHA) -> Estimate:
    """Self-normalized IPS, normalized per position (module docstring); CI by the delta method."""
    lg = _log(logged, clicks, target, propensities)
    w = _w(lg)
    value, se = _sum_of_ratios(w * lg.clicks, w, _f(lg.target))
    return _estimate("snips", value, se, len(lg.logged), float((lg.target >= 0).sum(axis=1).mean()), alpha)


def doubly_robust(logged: Any, clicks: Any, propensities: Any, target: Any, q_target: Any, *, alpha: float = ALPHA) -> Estimate:
    """Doubly robust (module docstring) with the reward model's click probability of each target item
    at its position, `q_target` (n, k_target); CI normal over lists."""
    lg = _log(logged, clicks, target, propensities)
    kt = np.shape(target)[1]
    q = _floats(q_target, "q_target", (len(lg.logged), kt))
    q = np.hstack([q, np.zeros((len(q), lg.logged.shape[1] - kt))])
    q = np.where(lg.target >= 0, q, 0.0)
    value, se = _mean_se((q + _w(lg) * (lg.clicks - q)).sum(axis=1))
    return _estimate("dr", value, se, len(lg.logged), float((lg.target >= 0).sum(axis=1).mean()), alpha)


def replay(logged: Any, clicks: Any, target: Any, explored: Any, *, alpha: float = ALPHA) -> Estimate:
    """Replay (Li et al. 2011) on the lists the uniformly random branch drew (`explored`, (n,) bool,
    as bundle.policy.Slate.explored logs it): per position, the mean click of the explored lists whose
    logged item there is the target's; CI by the delta method."""
    ex = np.asarray(explored)
    if ex.dtype != bool or ex.shape != (np.shape(logged)[0],):
        raise ValueError(f"explored must be a bool array with one value per logged list ({np.shape(logged)[0]}), got shape {ex.shape} dtype {ex.dtype}")
    lg = _log(logged, clicks, target)
    if ex.sum() < 2:
        raise ValueError(f"explored: replay needs at least 2 explored lists, got {int(ex.sum())}")
    t, l, c = lg.target[ex], lg.logged[ex], lg.clicks[ex]
    m = ((l == t) & (t >= 0)).astype(np.float64)
    value, se = _sum_of_ratios(m * c, m, _f(t))
    return _estimate("replay", value, se, int(ex.sum()), float((t >= 0).sum(axis=1).mean()), alpha)


# ---------------------------------------------------------------------- support and reward models


def logging_propensities(target: Any, rankings: Any, k: int, epsilon: float, pool: int) -> np.ndarray:
    """mu(target_rj at j) under the logging policy that served list r (bundle.policy.propensity with
    the logging model's ranking `rankings[r]`, the served k, epsilon and pool): (n, k_target), 0 at
    empty target slots."""
    t = _items(target, "target")
    ranked = _items(rankings, "rankings")
    if ranked.shape[0] != t.shape[0]:
        raise ValueError(f"rankings must have one row per target list ({t.shape[0]}), got {ranked.shape[0]}")
    out = np.zeros(t.shape)
    for r in range(t.shape[0]):
        for j in range(t.shape[1]):
            if t[r, j] >= 0:
                out[r, j] = policy_propensity(int(t[r, j]), j, ranked[r], k, epsilon, pool)
    return out


def support(target: Any, target_propensities: Any) -> float:
    """Share of the target's (item, position) pairs the logging policy could show (mu > 0)."""
    t = _items(target, "target")
    mu = _floats(target_propensities, "target_propensities", t.shape)
    filled = t >= 0
    if not filled.any():
        raise ValueError("target shows no item")
    return float((mu[filled] > 0).mean())


def item_position_model(logged: Any, clicks: Any, n_items: int, *, smoothing: float = 10.0, iterations: int = 20) -> np.ndarray:
    """A reward model q̂(i, j) = theta_j * gamma_i fitted on a log, (n_items, k): the position-based
    model without the user (Richardson et al. 2007; Chuklin, Markov & de Rijke 2015, "Click Models
    for Web Search", §3.2), by the fixed point of its Poisson likelihood,

        gamma_i = (C_i + s * g) / (sum_j theta_j S_ij + s),    theta_j = C_j / sum_i gamma_i S_ij,  theta_0 = 1

    (S_ij shows and C_ij clicks of item i at j; C_i, C_j their margins; s = `smoothing` pseudo-shows
    at the pooled rate g = sum C / sum_ij theta_j S_ij). Items never shown get g."""
    lg = _log(logged, clicks, np.full((np.shape(logged)[0], 1), -1))
    if n_items < 1 or (lg.logged.size and lg.logged.max() >= n_items):
        raise ValueError(f"n_items must exceed every logged item index, got {n_items}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    k = lg.logged.shape[1]
    shown = lg.logged >= 0
    pos = np.broadcast_to(np.arange(k), lg.logged.shape)[shown]
    item = lg.logged[shown]
    flat = item * k + pos
    shows = np.bincount(flat, minlength=n_items * k).reshape(n_items, k).astype(np.float64)
    clk = np.bincount(flat, weights=lg.clicks[shown], minlength=n_items * k).reshape(n_items, k)
    c_item, c_pos, c_all = clk.sum(axis=1), clk.sum(axis=0), float(clk.sum())
    theta = np.ones(k)

    def gammas() -> np.ndarray:
        exposure = shows @ theta  # examinations of each item
        g = c_all / max(float(exposure.sum()), 1e-12)
        return (c_item + smoothing * g) / np.maximum(exposure + smoothing, 1e-12)

    for _ in range(iterations):
        gamma = gammas()
        denom = gamma @ shows
        theta = np.divide(c_pos, denom, out=np.zeros(k), where=denom > 0)
        if theta[0] > 0:
            theta /= theta[0]
    gamma = gammas()
    return np.clip(gamma[:, None] * theta[None, :], 0.0, 1.0)


def crossfit_q_target(logged: Any, clicks: Any, target: Any, n_items: int, *, folds: int = 2, seed: int = 0, smoothing: float = 10.0) -> np.ndarray:
    """q̂(target_rj, j) for DR with `item_position_model` cross-fitted: each list's q̂ comes from the
    model fitted on the other folds, so its own clicks never enter its reward model (cross-fitting,
    Chernozhukov et al. 2018, "Double/debiased machine learning"). (n, k_target)."""
    lg = _log(logged, clicks, target)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    n, kt = len(lg.logged), np.shape(target)[1]
    fold = np.random.default_rng(seed).permutation(n) % folds
    out = np.zeros((n, kt))
    for f in range(folds):
        model = item_position_model(lg.logged[fold != f], lg.clicks[fold != f], n_items, smoothing=smoothing)
        t = lg.target[fold == f, :kt]
        out[fold == f] = np.where(t >= 0, model[np.maximum(t, 0), np.arange(kt)[None, :]], 0.0)
    return out


def evaluate(
    logged: Any,
    clicks: Any,
    propensities: Any,
    target: Any,
    *,
    explored: Any | None = None,
    q_target: Any | None = None,
    target_propensities: Any | None = None,
    n_items: int | None = None,
    alpha: float = ALPHA,
) -> dict:
    """Every estimator that the inputs allow, as a JSON-ready dict: IPS and SNIPS always; Replay with
    `explored`; DR with `q_target`, or with a cross-fitted `item_position_model` given `n_items`;
    the target's support with `target_propensities` (see logging_propensities)."""
    out: dict[str, Any] = {"lists": int(np.shape(logged)[0]), "estimates": {}}
    est = [ips(logged, clicks, propensities, target, alpha=alpha), snips(logged, clicks, propensities, target, alpha=alpha)]
    if q_target is None and n_items is not None:
        q_target = crossfit_q_target(logged, clicks, target, n_items)
    if q_target is not None:
        est.append(doubly_robust(logged, clicks, propensities, target, q_target, alpha=alpha))
    if explored is not None:
        est.append(replay(logged, clicks, target, explored, alpha=alpha))
    out["estimates"] = {e.estimator: e.to_dict() for e in est}
    if target_propensities is not None:
        out["support"] = support(target, target_propensities)
    return out
