"""Cold-start evaluation: items and users the model never saw in training.

Two experiments, each trains one model with the usual pipeline pieces (prepare -> filter ->
Context -> build_model -> RetrievalTask -> Trainer.fit; no tracking, no export, no store,
checkpoints in a temporary folder) and returns a flat dict of metrics. Ranking metrics are the
ones of ``training.evaluation`` (binary relevance, ``ranking_metrics``).

1. ``item_cold_start``: a seeded ``holdout`` share of the items that have interactions is
   removed from train and val entirely. They have zero training count, so ``RetrievalTask``
   marks them cold and ``item_embeddings`` scores them through the item OOV id row plus content
   (genres, release decade, title tokens): exactly how a newly added item would be served.

   - Truth (default ``truth="all"``): every interaction with a held-out item, whatever split it
     originally fell into. None of them was used in training, so all are unseen; keeping only the
     test split's share would discard ~75% of an already small signal. ``truth="test"`` keeps only
     the test split's rows. Evaluated users: every user with >= 1 truth item.
   - Candidates: ONLY the held-out items (scores restricted to those columns), so the question is
     "which of the new items will this user like", not "new vs known items".
   - History at scoring time: the user's train + val rows on the remaining (warm) items.
   - Baselines on the same candidates and users:
     * ``content``: cosine between the user's genre-count profile (their train + val history) and
       the item genre multi-hot; ties by lower item index.
     * ``random``: seeded uniform scores. Honest floor: new items have no popularity yet, and
       their count in the truth split would leak the answer.
     * ``recency``: newest release year first (metadata known when an item is added;
       non-personalised).
   - ``ratio_vs_content`` = hybrid NDCG@k / content NDCG@k (``ratio_vs_content/recall@k`` too).
   - ``warm/…``: the same model's usual full-ranking test metrics on the warm items (sanity).

2. ``user_cold_start``: a seeded ``holdout`` share of the users with interactions is removed from
   training entirely. Each is then served with an EMPTY history, the user-id OOV row, their
   demographics (when the model uses them; consent assumed at sign-up) and stated genres:

   - Data with stated preferences (synthetic): their stated liked / avoided genres.
   - Data without (MovieLens): the 2 most frequent genres among their OWN held-out rated items
     ("unknown" excluded; ties by lower genre index), nothing avoided. A proxy for a user stating
     tastes at sign-up; it is derived from the truth set, so read NDCG/recall as optimistic.

   Reported: ``genre_match`` (per user, the share of the top-k items with >= 1 stated liked genre;
   then the mean over users), NDCG@k / Recall@k against all their ratings (any split), for:
   ``hybrid`` (the user tower as described), ``hybrid_no_stated`` (same, stated genres left out),
   ``hybrid_stated_first`` (a serving policy: the tower's ranking with the items carrying a stated
   genre moved first), ``popularity`` (train + val counts of the remaining users) and
   ``genre_popularity`` (the most popular items having a stated genre: a non-learned baseline on
   the same stated input). ``truth/genre_match`` is the share of the users' actual rated items
   carrying a stated genre: the level an exact list would show, for reading the others.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from features.schema import Interactions
from training import evaluation
from training.config import TrainConfig
from training.data import CSR, Context, csr_rows, gather_rows, kjt_from_feed, rated_csr, user_feed
from training.model import TwoTower
from training.pipeline import Prepared, build_model, context, item_counts, prepare
from training.task import RetrievalTask
from training.trainer import FitResult, Trainer, pick_device, seed_everything


# -------------------------------------------------------------------------- data holdouts
@dataclass
class Holdout:
    """The data of a cold-start experiment: `cold` (sorted item or user indices) is absent from
    `train` / `val` / `seen` (= train + val); `truth` holds their interactions, per user."""

    cold: np.ndarray
    train: CSR
    val: CSR
    seen: CSR
    truth: CSR
    users: np.ndarray  # the users evaluated (>= 1 truth item), sorted


def _pick(candidates: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    n = max(1, int(round(fraction * len(candidates))))
    return np.sort(np.random.default_rng(seed).choice(candidates, size=n, replace=False))


def _without(inter: Interactions, mask: np.ndarray) -> Interactions:
    return inter.take(~mask)


def _holdout(data: Prepared, cold: np.ndarray, column: Literal["item", "user"], truth_rows: Interactions) -> Holdout:
    n_users = data.dataset.n_users
    parts = data.split
    hit = lambda inter: np.isin(getattr(inter, column), cold)  # noqa: E731
    train, val = _without(parts.train, hit(parts.train)), _without(parts.val, hit(parts.val))
    truth = rated_csr(truth_rows.take(hit(truth_rows)), n_users)
    users = np.flatnonzero(np.diff(truth[0]) > 0)
    return Holdout(cold, rated_csr(train, n_users), rated_csr(val, n_users), rated_csr(Interactions.concat([train, val]), n_users), truth, users)


def hold_out_items(data: Prepared, fraction: float = 0.10, seed: int = 0, truth: Literal["all", "test"] = "all") -> Holdout:
    """Remove a seeded `fraction` of the items with interactions from train and val."""
    if truth not in ("all", "test"):
        raise ValueError(f"truth must be 'all' or 'test', got {truth!r}")
    active = np.unique(data.dataset.interactions.item)
    rows = data.dataset.interactions if truth == "all" else data.split.test
    return _holdout(data, _pick(active, fraction, seed), "item", rows)


def hold_out_users(data: Prepared, fraction: float = 0.10, seed: int = 0) -> Holdout:
    """Remove a seeded `fraction` of the users with interactions from training; truth = all their rows."""
    active = np.unique(data.dataset.interactions.user)
    return _holdout(data, _pick(active, fraction, seed), "user", data.dataset.interactions)


# -------------------------------------------------------------------------- training
@dataclass
class Fitted:
    model: TwoTower
    task: RetrievalTask
    ctx: Context
    device: torch.device
    fit: FitResult


def fit_model(cfg: TrainConfig, data: Prepared, train: CSR, val: CSR) -> Fitted:
    """Train like `pipeline.train` on the given CSRs (no tracking, export or store; checkpoints
    go to a temporary folder). Items with zero count in `train` are cold for the task."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    ds, m = data.dataset, cfg.model
    with tempfile.TemporaryDirectory(prefix="cold_start_") as tmp:
        tcfg = cfg.trainer.model_copy(update={"checkpoint_dir": tmp})
        seed_everything(tcfg.seed)
        ctx = context(cfg, ds)
        model = build_model(cfg, ds, ctx, device)
        task = RetrievalTask(cfg.task, item_counts(train, ds.n_items), m.item_id_dropout)
        trainer = Trainer(model, task, tcfg, cfg.task.history_dropout, m.user_id_dropout, device, m.demographics_dropout, m.stated_dropout)
        fit = trainer.fit(train, train, val, ctx)
    model.eval()
    return Fitted(model, task, ctx, device, fit)


# -------------------------------------------------------------------------- scoring helpers
def restricted_topk(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Top-k over the candidate columns only, as global item indices (U, k).

    `scores` is (U, len(candidates)): column j scores item ``candidates[j]``. Ties break by the
    lower column, as `evaluation.topk_from_scores` does.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if scores.shape[1] != len(candidates):
        raise ValueError(f"scores have {scores.shape[1]} columns for {len(candidates)} candidates")
    local = evaluation.topk_from_scores(scores, k)
    return np.where(local >= 0, candidates[np.maximum(local, 0)], -1)


def restricted_metrics(scores: np.ndarray, users: np.ndarray, candidates: np.ndarray, truth: CSR, k: int) -> dict[str, float]:
    """`evaluation.ranking_metrics` of the restricted top-k; coverage is a share of the candidates."""
    top = restricted_topk(scores, candidates, k)
    return evaluation.ranking_metrics(top, truth[:2], users, k, n_items=len(candidates))


def genre_matrix(ctx: Context, n_genres: int) -> np.ndarray:
    """(n_items, n_genres) float multi-hot of the item genres."""
    indptr, genres = ctx.items.genres
    hot = np.zeros((len(indptr) - 1, n_genres))
    hot[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), genres] = 1.0
    return hot


def genre_profile(history: CSR, users: np.ndarray, item_genres: np.ndarray) -> np.ndarray:
    """(U, n_genres): how many of each user's history items carry each genre."""
    lengths, items = gather_rows(history, users)
    rows = np.repeat(np.arange(len(users)), lengths)
    profile = np.zeros((len(users), item_genres.shape[1]))
    np.add.at(profile, rows, item_genres[items])
    return profile


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def content_scores(profile: np.ndarray, item_genres: np.ndarray) -> np.ndarray:
    """Cosine between user genre profiles (U, G) and item genre multi-hots (I, G)."""
    return _unit(profile) @ _unit(item_genres).T


def derive_stated(truth: CSR, users: np.ndarray, item_genres: np.ndarray, n: int = 2, exclude: tuple[int, ...] = ()) -> list[np.ndarray]:
    """The `n` most frequent genres among each user's truth items (ties: lower genre index),
    genres in `exclude` never chosen; sorted genre indices, fewer when fewer occur."""
    profile = genre_profile(truth, users, item_genres)
    profile[:, list(exclude)] = 0
    order = np.argsort(-profile, axis=1, kind="stable")[:, :n]
    return [np.sort(o[profile[i, o] > 0]) for i, o in enumerate(order)]


def truth_genre_match(truth: CSR, users: np.ndarray, liked: list[np.ndarray], item_genres: np.ndarray) -> np.ndarray:
    """Per user: share of their truth items with >= 1 liked genre (what an exact list would score)."""
    return np.array([
        float((item_genres[items][:, np.asarray(g, dtype=np.int64)].sum(axis=1) > 0).mean()) if len(items) and len(g) else np.nan
        for items, g in zip(csr_rows(truth, users), liked)
    ])  # fmt: skip


def genre_match(topk: np.ndarray, liked: list[np.ndarray], item_genres: np.ndarray) -> np.ndarray:
    """Per user: share of the (non-padding) top-k items that carry >= 1 of the user's liked
    genres; NaN for a user with no liked genre or an empty list."""
    topk = np.asarray(topk, dtype=np.int64)
    out = np.full(len(topk), np.nan)
    for u, (row, genres) in enumerate(zip(topk, liked)):
        row = row[row >= 0]
        if len(row) and len(genres):
            out[u] = float((item_genres[row][:, np.asarray(genres, dtype=np.int64)].sum(axis=1) > 0).mean())
    return out


@torch.no_grad()
def item_vectors(f: Fitted) -> np.ndarray:
    """The catalog as served: cold items (zero training count) through the OOV id row + content."""
    return f.task.item_embeddings(f.model, f.ctx, f.device).float().cpu().numpy()


@torch.no_grad()
def warm_user_vectors(f: Fitted, users: np.ndarray, history: CSR) -> np.ndarray:
    return f.task.user_embeddings(f.model, f.ctx, users, history, f.device).float().cpu().numpy()


@torch.no_grad()
def cold_user_vectors(f: Fitted, users: np.ndarray, liked: list[np.ndarray], avoided: list[np.ndarray] | None = None, demographics: bool = True) -> np.ndarray:
    """User-tower vectors of brand-new users: empty history, the user-id OOV row, `liked` /
    `avoided` stated genres, demographics when `demographics` (and the model uses them)."""
    spec = f.model.spec
    n_users = len(f.ctx.users.age)
    empty: CSR = (np.zeros(n_users + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    avoided = avoided if avoided is not None else [np.zeros(0, np.int64)] * len(users)
    feed = user_feed(spec, f.ctx, users, empty, np.full(len(users), spec.user_oov_index), np.full(len(users), demographics), liked, avoided)
    return f.model.user_arch(kjt_from_feed(spec, feed, f.device)).float().cpu().numpy()


def _prefixed(name: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{name}/{key}": float(v) for key, v in metrics.items()}


def _n_genres(data: Prepared) -> int:
    return len(data.dataset.genre_names)


# -------------------------------------------------------------------------- experiments
@dataclass
class Experiment:
    metrics: dict[str, float]
    holdout: Holdout
    fitted: Fitted
    extra: dict[str, Any]


def run_item_cold_start(cfg: TrainConfig, holdout: float = 0.10, seed: int = 0, k: int = 10, truth: Literal["all", "test"] = "all", data: Prepared | None = None) -> Experiment:
    data = data if data is not None else prepare(cfg)
    h = hold_out_items(data, holdout, seed, truth)
    if len(h.cold) < k:
        raise ValueError(f"only {len(h.cold)} held-out items for k={k}: raise the holdout share")
    f = fit_model(cfg, data, h.train, h.val)
    cold, users = h.cold, h.users

    hybrid = warm_user_vectors(f, users, h.seen) @ item_vectors(f)[cold].T
    item_genres = genre_matrix(f.ctx, _n_genres(data))
    content = content_scores(genre_profile(h.seen, users, item_genres), item_genres[cold])
    rng = np.random.default_rng(seed)
    random = rng.random((len(users), len(cold)))
    year = data.dataset.items.year[cold].astype(np.float64)
    recency = np.broadcast_to(year, (len(users), len(cold)))

    metrics: dict[str, float] = {}
    for name, scores in (("hybrid", hybrid), ("content", content), ("random", random), ("recency", recency)):
        metrics.update(_prefixed(name, restricted_metrics(scores, users, cold, h.truth, k)))
    for key in (f"ndcg@{k}", f"recall@{k}"):
        base = metrics[f"content/{key}"]
        ratio = metrics[f"hybrid/{key}"] / base if base > 0 else float("inf")
        metrics["ratio_vs_content" if key.startswith("ndcg") else f"ratio_vs_content/{key}"] = ratio

    # the warm catalogue's usual test (history = train + val, warm test rows only)
    test = data.split.test
    warm_test = rated_csr(test.take(~np.isin(test.item, cold)), data.dataset.n_users)
    metrics.update(_prefixed("warm", f.task.metrics(f.model, h.seen, warm_test, f.ctx, f.device)))
    metrics.update({
        "n_items": float(data.dataset.n_items), "n_cold_items": float(len(cold)), "n_users_evaluated": float(len(users)),
        "n_truth": float(len(h.truth[1])), "cold_item_id_is_oov": float(f.task.cold[cold].all()),
        "train/best_epoch": float(f.fit.best_epoch), "train/seconds": f.fit.seconds,
    })  # fmt: skip
    return Experiment(metrics, h, f, {"truth": truth})


def item_cold_start(cfg: TrainConfig, holdout: float = 0.10, seed: int = 0, k: int = 10, truth: Literal["all", "test"] = "all") -> dict[str, float]:
    """Item cold start (see the module doc): hybrid vs content-only vs random / recency on the held-out items."""
    return run_item_cold_start(cfg, holdout, seed, k, truth).metrics


def run_user_cold_start(cfg: TrainConfig, holdout: float = 0.10, seed: int = 0, k: int = 10, data: Prepared | None = None) -> Experiment:
    data = data if data is not None else prepare(cfg)
    h = hold_out_users(data, holdout, seed)
    f = fit_model(cfg, data, h.train, h.val)
    users, n_items = h.users, data.dataset.n_items
    item_genres = genre_matrix(f.ctx, _n_genres(data))

    stated_source = "dataset" if f.ctx.users.has_stated else "derived"
    if f.ctx.users.has_stated:
        liked, avoided = csr_rows(f.ctx.users.liked, users), csr_rows(f.ctx.users.avoided, users)
    else:  # no stated preferences in the data: 2 most frequent genres of their own ratings
        unknown = tuple(i for i, g in enumerate(data.dataset.genre_names) if g.lower() == "unknown")
        liked, avoided = derive_stated(h.truth, users, item_genres, 2, unknown), [np.zeros(0, np.int64)] * len(users)
    demographics = cfg.model.use_demographics

    item_vec = item_vectors(f)
    none = [np.zeros(0, np.int64)] * len(users)
    pop = item_counts(h.seen, n_items)
    stated_hot = np.zeros((len(users), item_genres.shape[1]))
    for i, g in enumerate(liked):
        stated_hot[i, g] = 1.0
    has_stated = (stated_hot @ item_genres.T) > 0
    hybrid = cold_user_vectors(f, users, liked, avoided, demographics) @ item_vec.T
    scorers = {
        "hybrid": hybrid,
        # serving policy on top of the tower: items with a stated genre first, in the tower's order
        "hybrid_stated_first": hybrid + has_stated * (np.abs(hybrid).max() * 2 + 1.0),
        "hybrid_no_stated": cold_user_vectors(f, users, none, none, demographics) @ item_vec.T,
        "popularity": np.broadcast_to(pop, (len(users), n_items)),
        # popularity among the items with a stated genre; the others after them
        "genre_popularity": pop[None, :] + has_stated * (pop.max() + 1.0),
    }
    metrics: dict[str, float] = {}
    lists: dict[str, np.ndarray] = {}
    for name, scores in scorers.items():
        top = evaluation.topk_from_scores(np.asarray(scores, dtype=np.float64), k)
        lists[name] = top
        metrics.update(_prefixed(name, evaluation.ranking_metrics(top, h.truth[:2], users, k, n_items)))
        metrics[f"{name}/genre_match"] = float(np.nanmean(genre_match(top, liked, item_genres)))
        if any(len(a) for a in avoided):
            metrics[f"{name}/avoided_share"] = float(np.nanmean(genre_match(top, avoided, item_genres)))
        metrics[f"{name}/empty_lists"] = float((top[:, 0] < 0).sum())
    # reference: the genre-match share of what these users actually rated
    metrics["truth/genre_match"] = float(np.nanmean(truth_genre_match(h.truth, users, liked, item_genres)))
    metrics.update({
        "n_users": float(data.dataset.n_users), "n_cold_users": float(len(h.cold)), "n_users_evaluated": float(len(users)),
        "n_truth": float(len(h.truth[1])), "mean_stated_genres": float(np.mean([len(g) for g in liked])),
        "stated_from_dataset": float(stated_source == "dataset"), "uses_demographics": float(demographics),
        "train/best_epoch": float(f.fit.best_epoch), "train/seconds": f.fit.seconds,
    })  # fmt: skip
    return Experiment(metrics, h, f, {"liked": liked, "avoided": avoided, "lists": lists, "stated_source": stated_source})


def user_cold_start(cfg: TrainConfig, holdout: float = 0.10, seed: int = 0, k: int = 10) -> dict[str, float]:
    """User cold start (see the module doc): empty history + stated genres through the user tower."""
    return run_user_cold_start(cfg, holdout, seed, k).metrics
