"""A simulated population with known preferences and a position-based click model: the ground truth
that controlled experiments and off-policy estimates are checked against. Numpy only.

Preferences. The users and items are those of `features.synthetic.generate(cfg)` (same config, same
seed): this module redraws the generator's latent structure from the same seeded stream (item
popularity rank, item genres, item factors q, user genre taste, user factors p; a test checks that
the redraw reproduces the generated items' genres and users' liked / avoided genres), and takes as a
user's utility for an item the very logit the generator sampled that user's history from:

    utility(u, i) = -popularity_exponent * log(rank_i)
                    + taste_strength * taste_u . genres_i / |genres_i|  +  factor_strength * p_u . q_i

Relevance is a logistic function of the utility standardized over all (user, item) pairs:

    rel(u, i) = sigmoid(alpha + beta * (utility(u, i) - m) / s)      (m, s: mean and std of utility)

With the defaults (alpha -3, beta 1) an average pair has rel ≈ 0.05 and a user's best items ≈ 0.3-0.5.

Clicks: the position-based model (PBM; Richardson, Dominowska & Ragno 2007; Craswell et al. 2008;
the click model of Li et al. 2018, "Offline Evaluation of Ranking Policies with Click Models"):

    P(click | u, i, position j) = theta_j * rel(u, i),    theta_j = (j + 1) ** -eta,   j = 0, 1, ...

i.e. a user examines position j with probability theta_j (1 at the top, decreasing; eta = 1 is the
examination curve of Joachims, Swaminathan & Schnabel 2017, "Unbiased Learning-to-Rank with Biased
Feedback") and clicks an examined item with probability rel(u, i), independently of the other items
shown. Hence the exact online value of any list L shown to u:

    E[clicks | u, L] = sum_j theta_j * rel(u, L_j),      CTR per shown item = E[clicks] / |L|,

and of a policy, the mean of that over the lists it serves (`expected_clicks`, `expected_ctr`).
Lists are int64 (n, k) arrays of item indices, position 0 first, -1 an empty slot (never clicked).
`clicks_for(user_id, item_ids, rng)` is the same model on the ids of the HTTP API ("u12", "i735"),
for driving a served recommender over loopback. `simulate_experiment` runs a whole user-randomized
A/B test on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from features.config import SyntheticConfig
from features.synthetic import _item_genres
from features.vocab import Vocab

EXACT_MOMENTS_MAX_PAIRS = 50_000_000  # above this many (user, item) pairs, m and s come from a seeded sample
MOMENT_SAMPLE = 1_000_000
_CHUNK = 2048  # users per utility block


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _as_lists(lists: np.ndarray, n_items: int, name: str = "lists") -> np.ndarray:
    a = np.asarray(lists)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 2-D integer array (lists, positions), got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < -1 or a.max() >= n_items):
        raise ValueError(f"{name} holds item indices outside [0, {n_items}) (-1 is an empty slot)")
    return a


@dataclass(frozen=True)
class Latent:
    """The generator's latent structure (see features.synthetic.generate)."""

    pop_logit: np.ndarray  # (I,) -popularity_exponent * log(rank)
    item_genre_mean: np.ndarray  # (I, G) genre one-hot / genres per item
    q: np.ndarray  # (I, F) item factors
    taste: np.ndarray  # (U, G) genre taste
    p: np.ndarray  # (U, F) user factors


def latent(cfg: SyntheticConfig) -> Latent:
    """Redraw features.synthetic.generate's latent arrays: its first draws, in its order, from
    default_rng(cfg.seed). tests/features/test_click_sim.py checks this against generate(cfg)."""
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, n_genres, n_factors = cfg.n_users, cfg.n_items, cfg.n_genres, cfg.n_factors
    rank = rng.permutation(n_items) + 1
    pop_logit = -cfg.popularity_exponent * np.log(rank)
    item_genre = _item_genres(rng, n_items, n_genres)
    q = rng.normal(0.0, n_factors**-0.25, size=(n_items, n_factors))
    taste = rng.normal(0.0, 1.0, size=(n_users, n_genres))
    p = rng.normal(0.0, n_factors**-0.25, size=(n_users, n_factors))
    return Latent(pop_logit, item_genre / item_genre.sum(axis=1, keepdims=True), q, taste, p)


class Population:
    """Users with known relevance rel(u, i) and a position-based click model (module docstring).

    `cfg`: the synthetic generator's config (users, items, seed); `eta`: examination decay;
    `alpha`, `beta`: the relevance link. Deterministic: no randomness outside the `rng` arguments."""

    def __init__(self, cfg: SyntheticConfig | None = None, *, eta: float = 1.0, alpha: float = -3.0, beta: float = 1.0):
        self.cfg = cfg if cfg is not None else SyntheticConfig()
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be finite and >= 0 (theta non-increasing), got {eta}")
        if not (np.isfinite(alpha) and np.isfinite(beta)):
            raise ValueError(f"alpha and beta must be finite, got alpha={alpha}, beta={beta}")
        self.eta, self.alpha, self.beta = float(eta), float(alpha), float(beta)
        self.latent = latent(self.cfg)
        self.n_users, self.n_items = self.cfg.n_users, self.cfg.n_items
        self.user_vocab = Vocab([f"u{i}" for i in range(1, self.n_users + 1)], kind="user")  # generate()'s ids
        self.item_vocab = Vocab([f"i{i}" for i in range(1, self.n_items + 1)], kind="item")
        self._m, self._s = self._moments()

    # ------------------------------------------------------------ preferences

    def _utility_rows(self, users: np.ndarray) -> np.ndarray:
        lat, c = self.latent, self.cfg
        return lat.pop_logit[None, :] + c.taste_strength * lat.taste[users] @ lat.item_genre_mean.T + c.factor_strength * lat.p[users] @ lat.q.T

    def _utility_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """utility(users[r], items[r, j]) for (n,) users and (n, m) items (no -1 here)."""
        lat, c = self.latent, self.cfg
        taste = np.einsum("ng,nmg->nm", lat.taste[users], lat.item_genre_mean[items])
        factors = np.einsum("nf,nmf->nm", lat.p[users], lat.q[items])
        return lat.pop_logit[items] + c.taste_strength * taste + c.factor_strength * factors

    def _moments(self) -> tuple[float, float]:
        """Mean and std of utility over all (user, item) pairs: exact up to EXACT_MOMENTS_MAX_PAIRS pairs,
        else over a sample seeded by cfg.seed."""
        if self.n_users * self.n_items <= EXACT_MOMENTS_MAX_PAIRS:
            total = total_sq = 0.0
            for lo in range(0, self.n_users, _CHUNK):
                u = self._utility_rows(np.arange(lo, min(lo + _CHUNK, self.n_users)))
                total += float(u.sum())
                total_sq += float(np.square(u).sum())
            n = self.n_users * self.n_items
            mean = total / n
            return mean, float(np.sqrt(max(total_sq / n - mean * mean, 0.0)))
        rng = np.random.default_rng([self.cfg.seed, 1])
        u = self._utility_pairs(rng.integers(0, self.n_users, MOMENT_SAMPLE), rng.integers(0, self.n_items, (MOMENT_SAMPLE, 1)))
        return float(u.mean()), float(u.std())

    def _users(self, users: np.ndarray | Sequence[int] | int) -> np.ndarray:
        u = np.atleast_1d(np.asarray(users))
        if u.ndim != 1 or (u.size and not np.issubdtype(u.dtype, np.integer)):
            raise ValueError(f"users must be a 1-D integer array of user indices, got shape {u.shape} dtype {u.dtype}")
        u = u.astype(np.int64, copy=False)
        if u.size and (u.min() < 0 or u.max() >= self.n_users):
            raise ValueError(f"users holds indices outside [0, {self.n_users})")
        return u

    def scores(self, users: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """The standardized utility z(u, i) = (utility - m) / s for every item, (len(users), n_items):
        rel = sigmoid(alpha + beta z), so ranking by z is ranking by true relevance."""
        u = self._users(users)
        out = np.empty((len(u), self.n_items))
        for lo in range(0, len(u), _CHUNK):
            out[lo : lo + _CHUNK] = (self._utility_rows(u[lo : lo + _CHUNK]) - self._m) / self._s
        return out

    def relevance_matrix(self, users: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """rel(u, i) for every item: (len(users), n_items)."""
        return _sigmoid(self.alpha + self.beta * self.scores(users))

    def relevance(self, users: np.ndarray | Sequence[int], lists: np.ndarray) -> np.ndarray:
        """rel(users[r], lists[r, j]), (n, k); 0 at empty slots (-1)."""
        u = self._users(users)
        items = _as_lists(lists, self.n_items)
        if len(u) != len(items):
            raise ValueError(f"users ({len(u)}) and lists ({len(items)}) must have one row each")
        valid = items >= 0
        rel = _sigmoid(self.alpha + self.beta * (self._utility_pairs(u, np.where(valid, items, 0)) - self._m) / self._s)
        return np.where(valid, rel, 0.0)

    # ------------------------------------------------------------ clicks

    def theta(self, k: int) -> np.ndarray:
        """Examination probabilities of positions 0..k-1: (j + 1) ** -eta (1 at the top, non-increasing)."""
        return (np.arange(k, dtype=np.float64) + 1.0) ** -self.eta

    def click_probabilities(self, users: np.ndarray | Sequence[int], lists: np.ndarray) -> np.ndarray:
        """P(click) of each shown item, theta_j * rel(u, L_j): (n, k), 0 at empty slots."""
        rel = self.relevance(users, lists)
        return rel * self.theta(rel.shape[1])[None, :]

    def expected_clicks(self, users: np.ndarray | Sequence[int], lists: np.ndarray) -> np.ndarray:
        """Exact expected clicks of each list, sum_j theta_j rel(u, L_j): (n,)."""
        return self.click_probabilities(users, lists).sum(axis=1)

    def expected_ctr(self, users: np.ndarray | Sequence[int], lists: np.ndarray) -> float:
        """Exact online CTR per shown item of serving `lists[r]` to `users[r]` (each row once):
        sum of expected clicks / number of shown items (empty slots are not shown)."""
        items = _as_lists(lists, self.n_items)
        shown = int((items >= 0).sum())
        if shown == 0:
            raise ValueError("lists show no item: the CTR per shown item is undefined")
        return float(self.expected_clicks(users, items).sum() / shown)

    def sample_clicks(self, users: np.ndarray | Sequence[int], lists: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One draw of the click model: (n, k) bool, each shown item clicked with prob theta_j rel(u, L_j)."""
        prob = self.click_probabilities(users, lists)
        return rng.random(prob.shape) < prob

    def clicks_for(self, user_id: str, item_ids: Sequence[str], rng: np.random.Generator) -> list[bool]:
        """The click model on raw ids, for driving the HTTP API: `item_ids` as the API returned them
        (position 0 first). An id the population does not have raises ValueError naming it."""
        if not isinstance(user_id, str) or user_id not in self.user_vocab:
            raise ValueError(f"user_id: {user_id!r} is not a simulated user (u1..u{self.n_users})")
        bad = [i for i in item_ids if not isinstance(i, str) or i not in self.item_vocab]
        if bad:
            raise ValueError(f"item_ids: {bad[:5]!r} not simulated items (i1..i{self.n_items})")
        if not item_ids:
            return []
        items = self.item_vocab.encode(list(item_ids))[None, :]
        return [bool(c) for c in self.sample_clicks([self.user_vocab.index(user_id)], items, rng)[0]]

    # ------------------------------------------------------------ policies

    def top_k(self, users: np.ndarray | Sequence[int], k: int, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Each user's k items of highest relevance (the oracle, best first), or of z + N(0, noise²)
        (`scores` plus noise in units of its standard deviation: a deliberately imperfect model; needs
        `rng`): (n, k) int64."""
        u = self._users(users)
        if noise > 0 and rng is None:
            raise ValueError("top_k: noise > 0 needs an rng")
        out = np.empty((len(u), k), dtype=np.int64)
        for lo in range(0, len(u), _CHUNK):
            s = self.scores(u[lo : lo + _CHUNK])
            if noise > 0:
                s += rng.normal(0.0, noise, size=s.shape)
            out[lo : lo + _CHUNK] = rank(s, k)
        return out


def rank(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best columns of each row of `scores`, best first: (n, k) int64. Ties within the k are
    ordered by column; which of several tied columns makes the cut at the k-th place is numpy's choice."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in [1, {s.shape[-1] if s.ndim else 0}] for scores of shape {s.shape}, got {k}")
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.lexsort((top, -np.take_along_axis(s, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


@dataclass(frozen=True)
class ExperimentLog:
    """One simulated user-randomized experiment, one row per exposure (a served list)."""

    user: np.ndarray  # (n,) population user index of the exposure
    unit: np.ndarray  # (n,) experiment participant (0..n_participants-1): the randomization unit
    arm: np.ndarray  # (n,) arm name of the participant
    lists: np.ndarray  # (n, k) items shown
    clicks: np.ndarray  # (n, k) bool
    assigned: dict[str, int]  # participants per arm
    true_ctr: dict[str, float]  # exact CTR per shown item of each arm over the population


def simulate_experiment(
    population: Population,
    arms: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    weights: Mapping[str, float],
    n_participants: int,
    rng: np.random.Generator,
    *,
    mean_exposures: float = 3.0,
    split: Mapping[str, float] | None = None,
) -> ExperimentLog:
    """A user-randomized A/B(/n) test on the population.

    Participants are drawn uniformly with replacement from the population (an i.i.d. sample of it);
    each is assigned an arm independently with probability `split` (default: the configured
    `weights`; pass another split to simulate a broken assignment), sees 1 + Poisson(mean_exposures - 1)
    lists, each the arm's list for that user (`arms[name](users) -> (n, k)` lists), and clicks by the
    click model. `true_ctr[arm]` is the arm's exact CTR per shown item over the whole population
    (exposure counts do not depend on the arm, so it is sum_u E[clicks_u] / sum_u |L_u|)."""
    if set(arms) != set(weights) or not arms:
        raise ValueError(f"weights must name exactly the arms {sorted(arms)}, got {sorted(weights)}")
    if n_participants < 1:
        raise ValueError(f"n_participants must be >= 1, got {n_participants}")
    if mean_exposures < 1:
        raise ValueError(f"mean_exposures must be >= 1, got {mean_exposures}")
    names = list(arms)
    split = dict(weights if split is None else split)
    if set(split) != set(names) or any(split[a] < 0 for a in names) or sum(split.values()) <= 0:
        raise ValueError(f"split must give every arm {names} a weight >= 0, got {split}")
    prob = np.array([split[a] for a in names], dtype=np.float64)
    prob /= prob.sum()
    everyone = np.arange(population.n_users)
    arm_lists = {a: _as_lists(arms[a](everyone), population.n_items, f"arms[{a!r}](users)") for a in names}
    true_ctr = {a: population.expected_ctr(everyone, arm_lists[a]) for a in names}

    who = rng.integers(0, population.n_users, n_participants)
    arm_of = rng.choice(len(names), size=n_participants, p=prob)
    n_exp = 1 + rng.poisson(mean_exposures - 1.0, n_participants)
    unit = np.repeat(np.arange(n_participants), n_exp)
    user = who[unit]
    arm_idx = arm_of[unit]
    k = max(v.shape[1] for v in arm_lists.values())
    lists = np.full((len(unit), k), -1, dtype=np.int64)
    for a, name in enumerate(names):
        rows = arm_idx == a
        lists[rows, : arm_lists[name].shape[1]] = arm_lists[name][user[rows]]
    clicks = population.sample_clicks(user, lists, rng)
    return ExperimentLog(
        user=user,
        unit=unit,
        arm=np.array(names, dtype=object)[arm_idx],
        lists=lists,
        clicks=clicks,
        assigned={name: int((arm_of == a).sum()) for a, name in enumerate(names)},
        true_ctr=true_ctr,
    )
