"""Full-ranking top-k evaluation with binary relevance, in numpy only.

Every model (ours and the non-torch peers in benchmarks/) is scored the same way:
rank *all* items for each test user, drop the items the user already saw in
training, and compare the top k with the held-out items. Numpy only (no torch)
so any scorer that returns a numpy matrix can reuse it.

Interaction sets are CSR pairs ``(indptr, indices)`` over users: the items of
user ``u`` are ``indices[indptr[u]:indptr[u + 1]]``, unique within a row. Any
object with ``.indptr`` and ``.indices`` (e.g. ``scipy.sparse.csr_matrix``) is
accepted too. ``csr_from_pairs`` builds one from (user, item) arrays.

Metric definitions follow Microsoft Recommenders' ``python_evaluation`` with
binary relevance; see ``ranking_metrics``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Csr = tuple[np.ndarray, np.ndarray]  # (indptr, indices)


# --------------------------------------------------------------------------- names
# The functions below compute under compact names (`ndcg@10`, `ndcg@10/age=<18`). Wherever a
# person reads a metric (the CLI, MLflow, the manifest and `/v1/model`, `trustrec report`) it has
# one name, `metric_name`'s: MLflow 3.17 takes only letters, digits and `_ - . / : space` in a
# metric key (mlflow.utils.validation.validate_param_and_metric_name), so `@`, `<`, `>`, `+` and
# `=` are spelled out there, and everywhere else the same way, so that one name finds one number.
# These are also the keys MLflow runs have carried since the first release: old runs compare.
_SPELLED = (("@", "_at_"), ("<", "lt"), (">", "gt"), ("+", "plus"), ("=", "_"))


def metric_name(name: str) -> str:
    """The published name of a metric: `test/ndcg@10` -> `test/ndcg_at_10`, `ndcg@10/gender=F` ->
    `ndcg_at_10/gender_F`, age `<18` -> `lt18`, `56+` -> `56plus`; anything else MLflow refuses
    -> `_`. A published name maps to itself."""
    for old, new in _SPELLED:
        name = name.replace(old, new)
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


class Metrics(dict):
    """Metrics under their published names (`metric_name`): keys, iteration, JSON and equality
    use those only. Lookups also take the computing spelling, so code written against
    `metrics["test/ndcg@10"]` reads `metrics["test/ndcg_at_10"]`."""

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **kw: Any):
        super().__init__()
        self.update(items, **kw)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(metric_name(key), value)

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(metric_name(key))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(metric_name(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(metric_name(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(metric_name(key), default)

    def pop(self, key: str, *default: Any) -> Any:
        return super().pop(metric_name(key), *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        return super().setdefault(metric_name(key), default)

    def update(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **kw: Any) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in [*pairs, *kw.items()]:
            self[key] = value

    def copy(self) -> "Metrics":
        return Metrics(self)

    def __reduce__(self):  # pickles (Ray, multiprocessing) as a Metrics, not a plain dict
        return (Metrics, (dict(self),))


def as_csr(csr: Any) -> Csr:
    """(indptr, indices) as int64 arrays, from a tuple or a scipy-like CSR object."""
    if hasattr(csr, "indptr") and hasattr(csr, "indices"):
        indptr, indices = csr.indptr, csr.indices
    else:
        indptr, indices = csr
    return np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> Csr:
    """CSR (indptr, indices) of the distinct (row, col) pairs, cols sorted within a row.

    Duplicates are dropped because recall and MAP divide by the number of
    *distinct* relevant items.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    pairs = np.unique(np.stack([rows, cols], axis=1), axis=0)  # sorted by row, then col
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=n_rows), out=indptr[1:])
    return indptr, pairs[:, 1].copy()


def _gather_rows(csr: Csr, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened entries of the selected CSR rows: (position in `rows`, column).

    Vectorized replacement for ``for i, r in enumerate(rows): indices[indptr[r]:indptr[r+1]]``.
    """
    indptr, indices = csr
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    pos = np.repeat(np.arange(len(rows)), counts)
    # offset of each entry inside its own row: 0, 1, .., count-1 per row
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return pos, indices[np.repeat(starts, counts) + offsets]


def topk_from_scores(
    scores: np.ndarray,
    k: int,
    exclude: Any | None = None,
    exclude_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Top-k item indices per row, best first; shape (U, k), int64.

    `exclude` is a CSR over users of items never to return (items seen in
    training); they are set to -inf before ranking. Row i of `scores` belongs
    to CSR row ``exclude_rows[i]`` (default: row i). NaN scores count as -inf.

    Ties are broken by the lower item index, deterministically, so metrics do
    not move between runs when a model (e.g. popularity) scores items equally.
    A plain argpartition picks an arbitrary subset of the items tied at the
    k-th score, so instead: partition to find the k-th largest score, keep every
    item above it plus the lowest-index items equal to it, then stable-sort
    those k by score.

    When fewer than k items have a finite score (everything else excluded),
    the remaining slots are -1, so an excluded item can never count as a hit.
    Peak memory is a few times ``scores``; callers bound it by batching.
    """
    scores = np.asarray(scores)
    s = np.array(scores, dtype=np.promote_types(scores.dtype, np.float32))  # copy: never mutate the caller's
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (users, items), got shape {s.shape}")
    n_rows, n_items = s.shape
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in [1, {n_items}] (number of items), got {k}")
    s[np.isnan(s)] = -np.inf
    if exclude is not None:
        rows = np.arange(n_rows) if exclude_rows is None else np.asarray(exclude_rows, dtype=np.int64)
        if len(rows) != n_rows:
            raise ValueError(f"exclude_rows has {len(rows)} entries for {n_rows} score rows")
        pos, items = _gather_rows(as_csr(exclude), rows)
        s[pos, items] = -np.inf

    kth = np.partition(s, n_items - k, axis=1)[:, n_items - k]  # k-th largest score per row
    above = s > kth[:, None]
    tied = s == kth[:, None]
    need = k - above.sum(axis=1)  # how many tied items still fit, lowest index first
    take = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need[:, None]))
    cols = np.nonzero(take)[1].reshape(n_rows, k)  # row-major: ascending item index in each row
    order = np.argsort(-np.take_along_axis(s, cols, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(cols, order, axis=1).astype(np.int64)
    top[np.take_along_axis(s, top, axis=1) == -np.inf] = -1
    return top


def relevance_matrix(
    topk: np.ndarray, truth_indptr: np.ndarray, truth_indices: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Boolean hits (U, k): ``topk[i, j]`` is a truth item of CSR row ``rows[i]``.

    Vectorized by encoding (row position, item) pairs as single int64 keys and
    testing membership with ``np.isin``. Padding (-1) is never a hit.
    """
    topk = np.asarray(topk, dtype=np.int64)
    pos, items = _gather_rows(as_csr((truth_indptr, truth_indices)), rows)
    width = max(int(topk.max(initial=-1)), int(items.max(initial=-1))) + 1
    truth_keys = pos * width + items
    top_keys = np.arange(len(topk), dtype=np.int64)[:, None] * width + topk
    return np.isin(top_keys, truth_keys) & (topk >= 0)


def _per_user_metrics(topk: np.ndarray, truth: Csr, users: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user metric arrays for the users with >= 1 truth item (others dropped),
    plus the distinct items recommended to them (for coverage)."""
    topk = np.asarray(topk, dtype=np.int64)
    if topk.ndim != 2 or topk.shape[1] < k:
        raise ValueError(f"topk must have shape (U, >= {k}), got {topk.shape}")
    topk = topk[:, :k]
    users = np.asarray(users, dtype=np.int64)
    if len(users) != len(topk):
        raise ValueError(f"{len(users)} users for {len(topk)} topk rows")
    indptr, indices = truth
    n_truth = (indptr[users + 1] - indptr[users])
    keep = n_truth > 0
    topk, users, n_truth = topk[keep], users[keep], n_truth[keep]

    hits = relevance_matrix(topk, indptr, indices, users).astype(np.float64)
    n_hits = hits.sum(axis=1)
    ranks = np.arange(1, k + 1)
    discount = 1.0 / np.log2(ranks + 1)
    ideal = np.cumsum(discount)[np.minimum(n_truth, k) - 1]  # IDCG: min(|truth|, k) hits on top
    precision_at_r = np.cumsum(hits, axis=1) / ranks
    return {
        "ndcg": (hits * discount).sum(axis=1) / ideal,
        "precision": n_hits / k,
        "recall": n_hits / n_truth,
        "map": (hits * precision_at_r).sum(axis=1) / n_truth,
        "recommended": np.unique(topk[topk >= 0]),  # for coverage; -1 is padding
    }


def _summarize(per_user: dict[str, np.ndarray], n_items: int, k: int) -> dict[str, float]:
    if len(per_user["ndcg"]) == 0:
        raise ValueError("no evaluated user has a truth item; metrics are undefined")
    distinct = np.unique(per_user["recommended"])
    return {
        f"ndcg@{k}": float(per_user["ndcg"].mean()),
        f"precision@{k}": float(per_user["precision"].mean()),
        f"recall@{k}": float(per_user["recall"].mean()),
        f"map@{k}": float(per_user["map"].mean()),
        "coverage": len(distinct) / n_items,
    }


def ranking_metrics(topk: np.ndarray, truth: Any, users: np.ndarray, k: int, n_items: int) -> dict[str, float]:
    """Mean ranking metrics over `users` (row i of `topk` is ``users[i]``) with >= 1 truth item.

    Users without truth items are skipped entirely: they count in no average,
    and their lists do not count towards coverage, so every number describes
    the same population. For one user, with hit_r = 1 if the item at rank r
    (1-based) is in the truth set T and n = hits in the top k:

    - precision@k = n / k
    - recall@k    = n / |T|
    - ndcg@k      = DCG / IDCG, DCG = sum_r hit_r / log2(r + 1) for r = 1..k,
      IDCG = sum_{r=1..min(|T|, k)} 1 / log2(r + 1) (all possible hits on top)
    - map@k       = (sum_{r <= k, hit_r} precision@r) / |T|, i.e. divided by
      the number of relevant items, like Recommenders' ``map`` (its
      ``map_at_k`` before v1.2; newer ``map_at_k`` divides by min(|T|, k))
    - coverage    = distinct items in all evaluated lists / n_items

    Raises ValueError when no user has a truth item (metrics undefined).
    """
    return _summarize(_per_user_metrics(topk, as_csr(truth), users, k), n_items, k)


def evaluate_scores(
    score_fn: Callable[[np.ndarray], np.ndarray],
    users: np.ndarray,
    train_csr: Any,
    test_csr: Any,
    n_items: int,
    k: int = 10,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Full-ranking metrics of a scorer, computed batch by batch.

    ``score_fn(user_batch)`` returns a (B, n_items) numpy score matrix; it is
    called on at most `batch_size` users at a time, so memory stays bounded by
    one batch of scores. Train items are excluded, users without test items
    are never scored. Per-user values are collected and averaged once at the
    end, so the result is identical to ``ranking_metrics`` on all users at once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, test = as_csr(train_csr), as_csr(test_csr)
    users = np.asarray(users, dtype=np.int64)
    users = users[test[0][users + 1] > test[0][users]]  # only users with something to find
    parts = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = np.asarray(score_fn(batch))
        if scores.shape != (len(batch), n_items):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected {(len(batch), n_items)}")
        topk = topk_from_scores(scores, k, exclude=train, exclude_rows=batch)
        parts.append(_per_user_metrics(topk, test, batch, k))
    if not parts:
        raise ValueError("no evaluated user has a truth item; metrics are undefined")
    per_user = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return _summarize(per_user, n_items, k)


def popularity_scores(train_csr: Any, n_items: int) -> np.ndarray:
    """Popularity baseline: number of training users per item, float32 (n_items,).

    The floor every model must beat. Use as a scorer with
    ``lambda users: np.broadcast_to(pop, (len(users), len(pop)))``; ties
    (equally popular items) rank by lower item index.
    """
    _, indices = as_csr(train_csr)
    return np.bincount(indices, minlength=n_items).astype(np.float32)
