"""Beyond-accuracy and fairness metrics of recommendation lists, in numpy only.

Accuracy (``training.evaluation``) says whether the lists hit the held-out
items; these metrics say *what* is recommended: how much of the catalogue
(coverage), how unexpected (novelty), how varied within a list (intra-list
diversity), how popular (ARP, exposure by popularity decile), how unequally
exposure is spread over items (Gini), how well a list reflects the genre mix
of the user's history (calibration), and whether accuracy differs between
user groups (NDCG per group).

Every function takes recommendation lists ``topk`` of shape (U, k), int64 item
indices, best first; -1 is padding (an empty slot) and is ignored everywhere.
Interaction sets are CSR pairs ``(indptr, indices)`` over users, as in
``training.evaluation``. A mean over an empty set (e.g. no list with two items
for diversity) is NaN rather than an exception, so one degenerate metric never
hides the others in a report.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from features import content
from features.content import AGE_LABELS
from features.schema import UNKNOWN_AGE
from training.evaluation import _gather_rows, _per_user_metrics, as_csr

N_DECILES = 10
UNKNOWN_AGE_LABEL = "unknown"


# --------------------------------------------------------------------------- helpers


def _as_topk(topk: np.ndarray) -> np.ndarray:
    topk = np.asarray(topk, dtype=np.int64)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (users, k), got shape {topk.shape}")
    return topk


def _check_items(topk: np.ndarray, n_items: int, what: str) -> None:
    """Refuse item indices outside [-1, n_items): they would index the wrong row silently."""
    if topk.size and (topk.min() < -1 or topk.max() >= n_items):
        raise ValueError(f"topk holds item indices outside [0, {n_items}) (and -1 padding) for {what}")


def _valid_items(topk: np.ndarray) -> np.ndarray:
    """All recommended item indices, padding dropped (flattened, row-major)."""
    return topk[topk >= 0]


def genres_multi_hot(item_genres: list[tuple[int, ...]], n_genres: int) -> np.ndarray:
    """(I, G) bool matrix from ``Items.genres`` (one tuple of genre indices per item)."""
    hot = np.zeros((len(item_genres), n_genres), dtype=bool)
    rows = np.repeat(np.arange(len(item_genres)), [len(g) for g in item_genres])
    cols = np.fromiter((g for gs in item_genres for g in gs), dtype=np.int64, count=len(rows))
    hot[rows, cols] = True
    return hot


def _mean_pairwise(dist: np.ndarray, valid: np.ndarray) -> float:
    """Mean over lists of the mean of ``dist[u, i, j]`` over pairs i < j of valid slots.

    ``dist`` is (U, k, k), ``valid`` (U, k) bool. Lists with fewer than two
    valid items have no pair and are left out of the mean (NaN if all are).
    """
    k = valid.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)  # each unordered pair once
    pair = valid[:, :, None] & valid[:, None, :] & upper
    n_pairs = pair.sum(axis=(1, 2))
    has_pairs = n_pairs > 0
    if not has_pairs.any():
        return float("nan")
    per_list = np.where(pair, dist, 0.0).sum(axis=(1, 2))[has_pairs] / n_pairs[has_pairs]
    return float(per_list.mean())


def _genre_distribution(rows: np.ndarray, items: np.ndarray, n_rows: int, multi_hot: np.ndarray) -> np.ndarray:
    """(n_rows, G) genre distribution p(g | row) of the items listed per row.

    Each item spreads weight 1 evenly over its genres, p(g | i) = 1/|genres(i)|
    (Steck 2018, Eq. 1 with uniform item weights), and each row is normalized
    to sum 1. Items without genres add nothing; a row whose items have no
    genre at all stays all zero.
    """
    n_genres = multi_hot.shape[1]
    entry, genre = np.nonzero(multi_hot[items])  # one (entry, genre) pair per genre of each item
    weight = 1.0 / multi_hot.sum(axis=1)[items[entry]]  # item spreads weight 1 over its genres
    flat = np.bincount(rows[entry] * n_genres + genre, weights=weight, minlength=n_rows * n_genres)
    dist = flat.reshape(n_rows, n_genres).astype(np.float64, copy=False)  # int64 when empty
    total = dist.sum(axis=1, keepdims=True)
    return np.divide(dist, total, out=np.zeros_like(dist), where=total > 0)


# --------------------------------------------------------------------------- catalogue


def coverage(topk: np.ndarray, n_items: int) -> float:
    """Catalogue coverage: |distinct recommended items| / n_items.

    Ge, Delgado-Battenfeld & Jannach, "Beyond accuracy: evaluating recommender
    systems by coverage and serendipity", RecSys 2010 (prediction coverage).
    """
    topk = _as_topk(topk)
    _check_items(topk, n_items, "coverage")
    return len(np.unique(_valid_items(topk))) / n_items


def novelty(topk: np.ndarray, item_pop: np.ndarray, n_users: int) -> float:
    """Mean self-information of the recommended items, in bits.

    novelty = mean over all recommended slots (u, r) of -log2 p_i, with
    p_i = item_pop[i] / n_users the share of users (with a history) who
    interacted with item i — Zhou et al., "Solving the apparent
    diversity-accuracy dilemma of recommender systems", PNAS 107(10), 2010.

    An item nobody interacted with has p_i = 0 and infinite self-information;
    it gets p_i = 1 / (n_users + 1) instead, as if one more user had seen it,
    which keeps it strictly more novel than any item seen once (-log2(1/n)).
    """
    topk = _as_topk(topk)
    item_pop = np.asarray(item_pop, dtype=np.float64)
    _check_items(topk, len(item_pop), "novelty")
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if item_pop.size and (item_pop.min() < 0 or item_pop.max() > n_users):
        raise ValueError(f"item_pop must count users, within [0, n_users={n_users}]")
    pop = item_pop[_valid_items(topk)]
    if pop.size == 0:
        return float("nan")
    p = np.where(pop > 0, pop / n_users, 1.0 / (n_users + 1))
    return float(-np.log2(p).mean())


def average_popularity(topk: np.ndarray, item_pop: np.ndarray) -> float:
    """Average recommendation popularity (ARP).

    ARP = (1/|U|) sum_u (1/|L_u|) sum_{i in L_u} item_pop[i] — Abdollahpouri,
    Burke & Mobasher, "Managing popularity bias in recommender systems with
    personalized re-ranking", FLAIRS 2019. Empty lists are left out.
    """
    topk = _as_topk(topk)
    item_pop = np.asarray(item_pop, dtype=np.float64)
    _check_items(topk, len(item_pop), "average_popularity")
    valid = topk >= 0
    n = valid.sum(axis=1)
    if not (n > 0).any():
        return float("nan")
    total = np.where(valid, item_pop[np.where(valid, topk, 0)], 0.0).sum(axis=1)
    return float((total[n > 0] / n[n > 0]).mean())


def exposure_gini(topk: np.ndarray, n_items: int) -> float:
    """Gini coefficient of how often each item is recommended, over ALL n_items.

    With x_1 <= ... <= x_n the exposure counts sorted ascending (items never
    recommended count 0), G = sum_i (2i - n - 1) x_i / (n sum_i x_i), i = 1..n:
    0 when every item is shown equally often, (n - 1)/n when one item takes
    every slot. Fleder & Hosanagar, "Blockbuster culture's next rise or fall",
    Management Science 55(5), 2009. NaN when nothing is recommended.
    """
    topk = _as_topk(topk)
    _check_items(topk, n_items, "exposure_gini")
    x = np.sort(np.bincount(_valid_items(topk), minlength=n_items)).astype(np.float64)
    if x.sum() == 0:
        return float("nan")
    i = np.arange(1, n_items + 1)
    return float(((2 * i - n_items - 1) * x).sum() / (n_items * x.sum()))


def exposure_by_popularity_decile(topk: np.ndarray, item_pop: np.ndarray) -> np.ndarray:
    """Share of all recommendation slots landing in each item-popularity decile, (10,).

    Items are sorted by popularity ascending (ties by lower item index) and
    split into 10 near-equal groups with ``np.array_split`` (the first groups
    get the extra items when n_items is not a multiple of 10); decile 0 holds
    the least popular items. The shares sum to 1 (all NaN when nothing is
    recommended). A popularity-biased model piles its slots into decile 9 —
    Abdollahpouri et al., "The unfairness of popularity bias in
    recommendation", RMSE workshop at RecSys 2019.
    """
    topk = _as_topk(topk)
    item_pop = np.asarray(item_pop)
    n_items = len(item_pop)
    _check_items(topk, n_items, "exposure_by_popularity_decile")
    order = np.lexsort((np.arange(n_items), item_pop))  # popularity asc, then index asc
    decile = np.empty(n_items, dtype=np.int64)
    for d, members in enumerate(np.array_split(order, N_DECILES)):
        decile[members] = d
    slots = _valid_items(topk)
    if slots.size == 0:
        return np.full(N_DECILES, np.nan)
    return np.bincount(decile[slots], minlength=N_DECILES) / slots.size


# --------------------------------------------------------------------------- diversity


def intra_list_diversity_genres(topk: np.ndarray, item_genres_multi_hot: np.ndarray) -> float:
    """Mean over lists of the mean pairwise genre distance 1 - Jaccard(G_i, G_j).

    Jaccard(A, B) = |A ∩ B| / |A ∪ B|; two items that both have no genre are
    indistinguishable by genre and count distance 0. Lists with fewer than two
    items are left out. Ziegler et al., "Improving recommendation lists
    through topic diversification", WWW 2005 (ILD), here with Jaccard distance.
    """
    topk = _as_topk(topk)
    hot = np.asarray(item_genres_multi_hot, dtype=bool)
    _check_items(topk, len(hot), "intra_list_diversity_genres")
    valid = topk >= 0
    g = hot[np.where(valid, topk, 0)].astype(np.float64)  # (U, k, G)
    inter = np.einsum("ukg,ulg->ukl", g, g)
    size = g.sum(axis=2)
    union = size[:, :, None] + size[:, None, :] - inter
    jaccard = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)  # both empty: same
    return _mean_pairwise(1.0 - jaccard, valid)


def intra_list_diversity_embeddings(topk: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean over lists of the mean pairwise cosine distance 1 - <v_i, v_j>.

    ``item_vectors`` (I, D) must be L2-normalized, so the dot product is the
    cosine; distances lie in [0, 2]. Lists with fewer than two items are left
    out. Ziegler et al., WWW 2005 (ILD) with embedding similarity.
    """
    topk = _as_topk(topk)
    vectors = np.asarray(item_vectors, dtype=np.float64)
    _check_items(topk, len(vectors), "intra_list_diversity_embeddings")
    valid = topk >= 0
    v = vectors[np.where(valid, topk, 0)]  # (U, k, D)
    return _mean_pairwise(1.0 - np.einsum("ukd,uld->ukl", v, v), valid)


# --------------------------------------------------------------------------- calibration


def genre_calibration_kl(
    topk: np.ndarray,
    history: Any,
    item_genres_multi_hot: np.ndarray,
    *,
    users: np.ndarray | None = None,
    alpha: float = 0.01,
) -> float:
    """Mean miscalibration KL(p || q~) of the lists' genres against the users' histories.

    Steck, "Calibrated recommendations", RecSys 2018:
    p(g|u) = genre distribution of the user's history, q(g|u) = that of the
    list (each item spreads weight 1 evenly over its genres),
    q~ = (1 - alpha) q + alpha p, and
    C_KL(p, q) = sum_g p(g|u) log(p(g|u) / q~(g|u))  (natural log, nats).
    alpha > 0 keeps it finite when the list misses a genre of the history
    (at most log(1/alpha), reached when q and p share no genre).

    Row i of `topk` belongs to history row ``users[i]`` (default: row i).
    Averaged over users whose history has at least one genre; the others are
    skipped (NaN if none is left).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    topk = _as_topk(topk)
    hot = np.asarray(item_genres_multi_hot, dtype=bool)
    _check_items(topk, len(hot), "genre_calibration_kl")
    n_rows = len(topk)
    users = np.arange(n_rows) if users is None else np.asarray(users, dtype=np.int64)
    if len(users) != n_rows:
        raise ValueError(f"{len(users)} users for {n_rows} topk rows")

    hist_rows, hist_items = _gather_rows(as_csr(history), users)
    p = _genre_distribution(hist_rows, hist_items, n_rows, hot)
    list_rows, list_cols = np.nonzero(topk >= 0)
    q = _genre_distribution(list_rows, topk[list_rows, list_cols], n_rows, hot)

    keep = p.sum(axis=1) > 0
    if not keep.any():
        return float("nan")
    p, q = p[keep], q[keep]
    q_tilde = (1 - alpha) * q + alpha * p  # > 0 wherever p > 0
    ratio = np.divide(p, q_tilde, out=np.ones_like(p), where=p > 0)  # p = 0 terms: 0 * log 1 = 0
    return float((p * np.log(ratio)).sum(axis=1).mean())


# --------------------------------------------------------------------------- user groups


def per_user_ndcg(topk: np.ndarray, truth: Any, users: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each row of `topk` (row i is ``users[i]``), shape (U,), float64.

    Exactly the definition of ``training.evaluation.ranking_metrics`` (it
    reuses its per-user computation), so ``np.nanmean(per_user_ndcg(...))``
    equals ranking_metrics' ``ndcg@k``. Users without truth items have no
    NDCG and get NaN.
    """
    truth = as_csr(truth)
    users = np.asarray(users, dtype=np.int64)
    indptr = truth[0]
    has_truth = indptr[users + 1] > indptr[users]
    out = np.full(len(users), np.nan)
    out[has_truth] = _per_user_metrics(topk, truth, users, k)["ndcg"]  # it keeps exactly these rows
    return out


def group_ndcg(per_user: np.ndarray, groups: np.ndarray) -> tuple[dict[Any, float], float]:
    """Mean NDCG per group label and the largest gap between two groups.

    Returns ({label: mean NDCG of its users}, max_label mean - min_label mean).
    NaN entries (users without truth) are dropped first, so a label appears
    only if one of its users has an NDCG; the gap is 0 for a single group and
    NaN for none. Ekstrand et al., "All the cool kids, how do they fit in?:
    Popularity and demographic biases in recommender evaluation and
    effectiveness", FAT* 2018.
    """
    per_user = np.asarray(per_user, dtype=np.float64)
    groups = np.asarray(groups)
    if per_user.shape != groups.shape or per_user.ndim != 1:
        raise ValueError(f"per_user {per_user.shape} and groups {groups.shape} must be equal-length 1-D")
    defined = ~np.isnan(per_user)
    labels, inverse = np.unique(groups[defined], return_inverse=True)
    means = np.bincount(inverse, weights=per_user[defined], minlength=len(labels)) / np.bincount(
        inverse, minlength=len(labels)
    )
    by_group = dict(zip(labels.tolist(), means.tolist()))
    gap = float(means.max() - means.min()) if len(means) else float("nan")
    return by_group, gap


def age_bucket(age: np.ndarray) -> np.ndarray:
    """MovieLens-1M age bucket labels of ages in years, (U,) str array: "<18", "18-24", ...,
    "56+", and "unknown" for negative ages. The buckets are `features.content`'s, so a
    report's groups are exactly the ones the model's age feature uses."""
    return np.array((UNKNOWN_AGE_LABEL, *AGE_LABELS))[content.age_bucket(np.where(np.asarray(age) < 0, UNKNOWN_AGE, age))]


# --------------------------------------------------------------------------- report


def beyond_accuracy_report(
    topk: np.ndarray,
    users: np.ndarray,
    history: Any,
    truth: Any,
    k: int,
    item_pop: np.ndarray,
    item_genres_multi_hot: np.ndarray,
    item_vectors: np.ndarray | None = None,
    user_groups: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """All beyond-accuracy metrics of the first k columns of `topk`, flat keys for MLflow.

    Row i of `topk` is user ``users[i]`` (a row of the `history` and `truth`
    CSRs); n_items = len(item_pop). Novelty's n_users is the number of users
    with a non-empty history. ``user_groups`` maps a group name to one label
    per user index (e.g. ``{"gender": ..., "age": age_bucket(users.age)}``);
    labels are read at ``groups[users]``. Keys:

    coverage, novelty, ild_genre, ild_embedding (only with item_vectors), arp,
    exposure_gini, calibration_kl, ndcg@{k}/{group}={label} per label,
    ndcg@{k}/{group}_max_gap, exposure_decile_{0..9}.
    """
    topk = _as_topk(topk)
    if topk.shape[1] < k:
        raise ValueError(f"topk must have shape (U, >= {k}), got {topk.shape}")
    topk = topk[:, :k]
    users = np.asarray(users, dtype=np.int64)
    item_pop = np.asarray(item_pop)
    n_items = len(item_pop)
    hist_indptr, _ = as_csr(history)
    n_users = int((np.diff(hist_indptr) > 0).sum())

    report = {
        "coverage": coverage(topk, n_items),
        "novelty": novelty(topk, item_pop, n_users),
        "ild_genre": intra_list_diversity_genres(topk, item_genres_multi_hot),
    }
    if item_vectors is not None:
        report["ild_embedding"] = intra_list_diversity_embeddings(topk, item_vectors)
    report["arp"] = average_popularity(topk, item_pop)
    report["exposure_gini"] = exposure_gini(topk, n_items)
    report["calibration_kl"] = genre_calibration_kl(topk, history, item_genres_multi_hot, users=users)

    if user_groups:
        ndcg = per_user_ndcg(topk, truth, users, k)
        for name, labels in user_groups.items():
            by_group, gap = group_ndcg(ndcg, np.asarray(labels)[users])
            for label, value in by_group.items():
                report[f"ndcg@{k}/{name}={label}"] = value
            report[f"ndcg@{k}/{name}_max_gap"] = gap

    for d, share in enumerate(exposure_by_popularity_decile(topk, item_pop)):
        report[f"exposure_decile_{d}"] = float(share)
    return report
