"""Top-k retrieval over exported item embeddings, behind one small interface.

Serving code asks a `TopK` for the best items of a batch of query vectors and
never cares how the search is done; `build_index` picks the implementation
(exact brute force today, approximate FAISS indexes can slot in later).
Numpy only: serving reads exported artifacts and never imports torch or training/.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

PAD_INDEX = -1  # item index of an empty slot (fewer than k candidates)
PAD_SCORE = -np.inf  # its score


class TopK(Protocol):
    """Maximum-inner-product search over a fixed item set."""

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k items per query: (scores float32 (B, k), item indices int64 (B, k)), best first.

        ``exclude[b]`` holds item indices never to return for query b.
        Slots without a candidate hold PAD_INDEX / PAD_SCORE.
        """
        ...

    def __len__(self) -> int:
        """Number of indexed items."""
        ...


class ExactTopK:
    """Brute-force dot product against every item: exact, fine up to ~1e6 items.

    If fewer than k items remain for a query (k > number of items, or too many
    excluded) the available ones come first and the rest is padded with index
    -1 and score -inf, so the output always has shape (B, k). Among equal
    scores the lower item index comes first; which of several items tied
    exactly at the k-th score is kept is left to argpartition.
    """

    def __init__(self, item_embeddings: np.ndarray):
        items = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        if items.ndim != 2:
            raise ValueError(f"item_embeddings must be 2-D (items, dim), got shape {items.shape}")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return self.items.shape[1]

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (B, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n_queries, n_items = len(queries), len(self)
        scores = queries @ self.items.T  # (B, N)
        if exclude is not None:
            self._apply_exclusion(scores, exclude)

        out_scores = np.full((n_queries, k), PAD_SCORE, dtype=np.float32)
        out_items = np.full((n_queries, k), PAD_INDEX, dtype=np.int64)
        kk = min(k, n_items)
        if kk == 0 or n_queries == 0:
            return out_scores, out_items
        cand = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_scores = np.take_along_axis(scores, cand, axis=1)
        order = np.lexsort((cand, -cand_scores), axis=1)  # score desc, then index asc
        top = np.take_along_axis(cand, order, axis=1)
        top_scores = np.take_along_axis(cand_scores, order, axis=1)
        top[top_scores == -np.inf] = PAD_INDEX  # excluded items filled the list: never return them
        out_scores[:, :kk] = top_scores
        out_items[:, :kk] = top
        return out_scores, out_items

    def _apply_exclusion(self, scores: np.ndarray, exclude: list[np.ndarray]) -> None:
        """Set excluded (query, item) scores to -inf, in place, in one scatter."""
        if len(exclude) != len(scores):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(scores)} queries")
        lists = [np.asarray(e, dtype=np.int64).ravel() for e in exclude]
        cols = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        # -1 would silently exclude the last item; refuse anything out of range
        if cols.size and (cols.min() < 0 or cols.max() >= len(self)):
            raise ValueError(f"exclude holds item indices outside [0, {len(self)})")
        rows = np.repeat(np.arange(len(lists)), [len(e) for e in lists])
        scores[rows, cols] = -np.inf


def build_index(item_embeddings: np.ndarray, kind: str = "exact") -> TopK:
    """The TopK implementation named by `kind` over `item_embeddings` (N, D)."""
    if kind == "exact":
        return ExactTopK(item_embeddings)
    raise ValueError(f"unknown index kind {kind!r}; available: 'exact'")
