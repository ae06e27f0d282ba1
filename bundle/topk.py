"""Top-k retrieval over exported item embeddings, behind one small interface.

Serving code (and anything else scoring a bundle) asks a `TopK` for the best items of a batch of
query vectors and never cares how the search is done; `build_index` picks the implementation:
exact brute force for small catalogs, an approximate FAISS index (IVF lists by default,
or an HNSW graph) from `ann_min_items` items up. FAISS is imported only when such an
index is built. Numpy only otherwise: part of the bundle contract (bundle/), which never imports
torch, training/ or serving/.

Every implementation answers the same way: (score desc, index asc) order, excluded items
never returned, PAD_INDEX / PAD_SCORE padding, scores = exact dot products of the items found.
Parameters are fixed defaults (not tuned per run) and builds are seeded/single-threaded where
it matters, so every replica of a model answers the same.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

PAD_INDEX = -1  # item index of an empty slot (fewer than k candidates)
PAD_SCORE = -np.inf  # its score
INDEX_KINDS = ("auto", "exact", "hnsw", "ivf")

# Figures below: benchmarks/ann.py on its synthetic clustered catalog (64 dims, top-100).
ANN_MIN_ITEMS = 100_000  # below this the exact scan (<= 25 MB read per query, ~2-3 ms on a quiet core) is exact and needs no build
ANN_KIND = "ivf"  # what "auto" builds from ANN_MIN_ITEMS up: at 300k items IVF reached recall@100 0.96 at 0.7 ms
#   where HNSW (M=48, efSearch=512) reached 0.95 at 1.7 ms after a 2x longer build; queries between clusters
#   (user vectors mix tastes) are hard for greedy graph search and easy for "scan the nearest lists"
HNSW_M = 32  # links per node: M=48 bought ~+0.04 recall@100 on 300k items for 2.3x the build time and 1.5x the links' memory
HNSW_EF_CONSTRUCTION = 128  # build beam: 2x the default 64 for a better graph; build time grows about linearly with it
HNSW_EF_SEARCH = 256  # search beam (raised to k): recall@100 0.95 at ~0.7 ms on 100k items; more beam = more recall, slower
# IVF defaults: nlist ~ 4 sqrt(N) lists (the FAISS guideline), nprobe lists scanned per query
IVF_NPROBE_FRACTION = 1 / 32  # lists scanned when ivf_nprobe is 0: on 1M items (nlist 4000, nprobe 125) recall@100 0.985,
#   p50 0.95 ms on a loaded 2-core machine; 1/16 gains 0.011 recall for twice the scan
IVF_TRAIN_PER_LIST = 64  # k-means trains on 64 points per list (FAISS warns under 39), seeded sample


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


def _as_items(item_embeddings: np.ndarray) -> np.ndarray:
    items = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    if items.ndim != 2:
        raise ValueError(f"item_embeddings must be 2-D (items, dim), got shape {items.shape}")
    return items


def _check_query(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries


def _check_exclude(exclude: list[np.ndarray], n_queries: int, n_items: int) -> list[np.ndarray]:
    """The exclusion lists as int64 arrays; refuses a wrong count or out-of-range indices."""
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_queries} queries")
    lists = [np.asarray(e, dtype=np.int64).ravel() for e in exclude]
    # -1 would silently exclude the last item; refuse anything out of range
    if any(e.size and (e.min() < 0 or e.max() >= n_items) for e in lists):
        raise ValueError(f"exclude holds item indices outside [0, {n_items})")
    return lists


class ExactTopK:
    """Brute-force dot product against every item: exact, fine up to ~1e6 items.

    If fewer than k items remain for a query (k > number of items, or too many
    excluded) the available ones come first and the rest is padded with index
    -1 and score -inf, so the output always has shape (B, k). Among equal
    scores the lower item index comes first; which of several items tied
    exactly at the k-th score is kept is left to argpartition.
    """

    def __init__(self, item_embeddings: np.ndarray):
        self.items = _as_items(item_embeddings)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return self.items.shape[1]

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_query(queries, k, self.dim)
        n_queries, n_items = len(queries), len(self)
        if n_queries == 1:
            return self._search_one(queries[0], k, None if exclude is None else _check_exclude(exclude, 1, n_items)[0])
        return self._search_many(queries, k, exclude)

    def _search_many(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
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

    def _search_one(self, query: np.ndarray, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`search` for one query, in 1-D (the usual batch at moderate load; the same answer as the
        batched path, with a third of its numpy calls)."""
        scores = (query[None, :] @ self.items.T)[0]  # (N,), the same product as the batched path
        if exclude is not None and len(exclude):
            scores[exclude] = -np.inf
        out_scores = np.full((1, k), PAD_SCORE, dtype=np.float32)
        out_items = np.full((1, k), PAD_INDEX, dtype=np.int64)
        kk = min(k, len(scores))
        if kk == 0:
            return out_scores, out_items
        cand = np.argpartition(-scores, kk - 1)[:kk]
        cand_scores = scores[cand]
        order = np.lexsort((cand, -cand_scores))  # score desc, then index asc
        top, top_scores = cand[order], cand_scores[order]
        top[top_scores == -np.inf] = PAD_INDEX  # excluded items filled the list: never return them
        out_scores[0, :kk] = top_scores
        out_items[0, :kk] = top
        return out_scores, out_items

    def _apply_exclusion(self, scores: np.ndarray, exclude: list[np.ndarray]) -> None:
        """Set excluded (query, item) scores to -inf, in place, in one scatter."""
        lists = _check_exclude(exclude, len(scores), len(self))
        cols = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        rows = np.repeat(np.arange(len(lists)), [len(e) for e in lists])
        scores[rows, cols] = -np.inf


class _FaissTopK:
    """What the FAISS indexes share: `len`, and `search` through `_faiss_search` with the
    per-search parameters the subclass gives (`_params(k)`)."""

    n_items: int
    dim: int

    def __len__(self) -> int:
        return self.n_items

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_query(queries, k, self.dim)
        return _faiss_search(self._faiss, self.index, queries, k, exclude, lambda: self._params(k))


class HnswTopK(_FaissTopK):
    """FAISS `IndexHNSWFlat` with inner product: approximate, ~1 ms per query on 1M items.

    Vectors are stored uncompressed (flat), so the scores of the items found are exact
    dot products; only which items are found is approximate (recall@k < 1). Excluded items
    are filtered inside the graph search with an `IDSelector`, so a query still gets k
    results however many items it excludes (over-fetching k + |exclude| would not bound
    the cost for a user who excludes a whole genre). Results are re-sorted by
    (score desc, index asc), the tie rule of `ExactTopK`, and padded the same way.

    The graph is built single-threaded: FAISS inserts nodes in parallel otherwise, and
    the graph (hence the answers) would change from one build to the next and differ
    between replicas. Searching uses FAISS's OpenMP threads across the queries of a batch.
    """

    def __init__(self, item_embeddings: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH, build_threads: int = 1):
        for name, value, low in (("m", m, 2), ("ef_construction", ef_construction, 1), ("ef_search", ef_search, 1), ("build_threads", build_threads, 1)):
            _check_int(f"hnsw {name}", value, low)
        import faiss

        items = _as_items(item_embeddings)  # FAISS keeps its own copy; this one is not held
        self.n_items, self.dim = items.shape
        self.m, self.ef_construction, self.ef_search = int(m), int(ef_construction), int(ef_search)
        self._faiss = faiss
        self.index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.index.hnsw.efSearch = self.ef_search
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(build_threads)  # 1: deterministic graph (see class doc); more: faster build
        try:
            self.index.add(items)
        finally:
            faiss.omp_set_num_threads(threads)

    def _params(self, k: int):
        return self._faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))  # the beam must hold at least k results


class IvfTopK(_FaissTopK):
    """FAISS `IndexIVFFlat` with inner product: k-means splits the catalog into `nlist` lists,
    a query scans the `nprobe` lists whose centroids score best. Approximate in which items
    are found (an item in an unscanned list is missed), exact in their scores (flat storage).

    nlist 0 means ~4 sqrt(N) lists, nprobe 0 means nlist / 32 of them (see the module constants).
    K-means trains on a seeded sample of 64 points per list, so the lists (and answers) are the
    same at every build. Exclusion, ordering and padding: as `HnswTopK` (an IDSelector inside
    the list scan, then (score desc, index asc))."""

    def __init__(self, item_embeddings: np.ndarray, nlist: int = 0, nprobe: int = 0, seed: int = 0):
        _check_int("ivf nlist", nlist, 0)
        _check_int("ivf nprobe", nprobe, 0)
        import faiss

        items = _as_items(item_embeddings)
        self.n_items, self.dim = items.shape
        if self.n_items == 0:
            raise ValueError("item_embeddings is empty: an IVF index needs at least one item")
        self.nlist = nlist or min(self.n_items, max(1, int(round(4 * np.sqrt(self.n_items)))))
        if self.nlist > self.n_items:
            raise ValueError(f"ivf nlist must be <= the number of items ({self.n_items}), got {self.nlist}")
        self.nprobe = min(nprobe or max(1, int(round(self.nlist * IVF_NPROBE_FRACTION))), self.nlist)
        self._faiss = faiss
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        rng = np.random.default_rng(seed)
        n_train = min(self.n_items, IVF_TRAIN_PER_LIST * self.nlist)
        sample = items if n_train == self.n_items else items[np.sort(rng.choice(self.n_items, n_train, replace=False))]
        self.index.train(sample)
        self.index.add(items)
        self.index.nprobe = self.nprobe

    def _params(self, k: int):
        return self._faiss.SearchParametersIVF(nprobe=self.nprobe)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _faiss_search(faiss, index, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None, make_params) -> tuple[np.ndarray, np.ndarray]:
    """Search a FAISS index; each query with excluded items gets its own call with an IDSelector
    that rejects them (so the index still finds k others), the rest go in one batched call."""
    n_queries, n_items = len(queries), index.ntotal
    if n_queries == 0:
        return np.full((0, k), PAD_SCORE, dtype=np.float32), np.full((0, k), PAD_INDEX, dtype=np.int64)
    lists = _check_exclude(exclude, n_queries, n_items) if exclude is not None else [np.empty(0, np.int64)] * n_queries
    scores = np.empty((n_queries, k), dtype=np.float32)
    items = np.empty((n_queries, k), dtype=np.int64)
    plain = [b for b, e in enumerate(lists) if not e.size]
    if plain:
        scores[plain], items[plain] = index.search(queries[plain], k, params=make_params())
    for b, banned in enumerate(lists):
        if banned.size:
            params = make_params()
            batch = faiss.IDSelectorBatch(banned)
            params.sel = selector = faiss.IDSelectorNot(batch)  # noqa: F841 (both must outlive the search)
            scores[b], items[b] = (a[0] for a in index.search(queries[b : b + 1], k, params=params))
    return _tidy(scores, items)


def _tidy(scores: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS output in ExactTopK's convention: missing slots = PAD, (score desc, index asc) order."""
    scores = scores.astype(np.float32, copy=True)
    items = items.astype(np.int64, copy=True)
    missing = items < 0
    scores[missing], items[missing] = PAD_SCORE, np.iinfo(np.int64).max  # pads sort last
    order = np.lexsort((items, -scores), axis=1)
    items, scores = np.take_along_axis(items, order, axis=1), np.take_along_axis(scores, order, axis=1)
    items[scores == PAD_SCORE] = PAD_INDEX
    return scores, items


def build_index(
    item_embeddings: np.ndarray,
    kind: str = "auto",
    ann_min_items: int = ANN_MIN_ITEMS,
    ann_kind: str = ANN_KIND,
    hnsw_m: int = HNSW_M,
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION,
    hnsw_ef_search: int = HNSW_EF_SEARCH,
    ivf_nlist: int = 0,
    ivf_nprobe: int = 0,
) -> TopK:
    """The TopK implementation named by `kind` over `item_embeddings` (N, D).

    "auto" builds `ann_kind` ("hnsw" or "ivf") when the catalog has at least `ann_min_items`
    items and searches exactly below that; "exact", "hnsw" and "ivf" force one."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; available: {', '.join(map(repr, INDEX_KINDS))}")
    if ann_kind not in ("hnsw", "ivf"):
        raise ValueError(f"unknown ann_kind {ann_kind!r}; available: 'hnsw', 'ivf'")
    _check_int("ann_min_items", ann_min_items, 1)
    if kind == "auto":
        kind = ann_kind if len(item_embeddings) >= ann_min_items else "exact"
    if kind == "exact":
        return ExactTopK(item_embeddings)
    if kind == "ivf":
        return IvfTopK(item_embeddings, ivf_nlist, ivf_nprobe)
    return HnswTopK(item_embeddings, hnsw_m, hnsw_ef_construction, hnsw_ef_search)
