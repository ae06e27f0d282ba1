"""EASE blend (`blend.ease`): a closed-form item-item model added to the trained two-tower, served
as one dot product, at a cost bounded whatever the catalog size.

EASE (Steck 2019) learns an item-item matrix B = I - P diag(1/diag P), P = (XᵀX + λI)⁻¹, from the
binary user x item matrix X in closed form. A low-rank two-tower and EASE make different errors,
and their per-user-scaled sum ranks better than either:

    s_u(i) = a · T_u(i) / sd_T(u) + (1 - a) · E_u(i) / sd_E(u),   T_u(i) = u·v_i,  E_u(i) = x_u B̃[:, i],

with sd_·(u) the population std of the user's scores over the whole catalog. B̃ is EASE fitted on
the **head**: the H most popular items (H = `blend.head_items`, a memory budget: the Gram and its
inverse are one dense H x H float64 array, 8·H² bytes), zero outside it, so tail items get the
two-tower's term only, and the same per-user scaling (the zeros count in sd_E). B_head is then
factored B_head ≈ B_head V Vᵀ, V (H x k) orthonormal spanning the directions in which the training
users' EASE scores X B_head vary most (randomized subspace iteration; B's plain SVD truncates what
matters less to ranking, see `factorize`); `blend.rank: null` keeps B_head exact (V = I). The
blend is the dot product of

    user [a·u / sd_T(u),  (1 - a)·z_u / sd_E(u)]   and   item [v_i,  Q_i],   z_u = x_u[head] P,

P = B_head V c, Q = V / c on head rows and 0 on tail rows (c balances the halves so that user
coordinates are O(1): float32 keeps them to ~1e-7), sd_T(u)² = u Cov(v) uᵀ, sd_E(u)² = z_u Cov(Q)
z_uᵀ over all n_items rows. The user half is an ONNX graph (one more history bag,
`training.export.EaseBlendArch`: (H + 1) x k floats), the item half is precomputed (n_items x k),
and serving needs no change but the wider vectors. (a, λ) are chosen on validation with the models
fitted on train (`choose`); B̃ is then refitted on train + val (`fit`).

Where the items have genres, `blend.genre_weights` may add them to EASE (collective EASE, Jeunen et
al. 2020): each genre is a pseudo-user of weight α who rated the genre's items, so the head's Gram
becomes XᵀX + α² F Fᵀ (F: item x genre, 0/1) and α is chosen on validation with (a, λ); B keeps its
shape, so nothing changes when served. Synthetic: α 3 on seeds 0-2, blend 0.3738 vs 0.3712.

Memory at every step: one H x H float64 array (plus a float32 copy of the Gram while choosing λ),
the sparse X, and score blocks of ~`SCORE_BLOCK` floats; never n_items².

ML-100k, MS protocol: 0.4960 ± 0.0010 full rank (`configs/two_tower_ease_ml100k.yaml`) vs 0.4737 for
the two-tower alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from training import evaluation
from training.data import CSR

log = logging.getLogger(__name__)

SD_FLOOR = 1e-6  # a per-user score std below this: the user gets 0 from that model (e.g. no history)
SCORE_BLOCK = 1 << 22  # floats per users x items score block (32 MB in float64): bounds evaluation memory
POWER_ITERATIONS = 4  # subspace iterations of the rank-k factorisation (each: 4 H² x (k + oversampling) flops)


def binary_matrix(csr: CSR, rows: np.ndarray, n_items: int, cols: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse 0/1 matrix (len(rows) x n_items, or x len(cols): those columns in that order) of the
    given users' items; a repeated (user, item) counts once."""
    indptr, indices = np.asarray(csr[0]), np.asarray(csr[1])
    rows = np.asarray(rows, np.int64)
    lengths = indptr[rows + 1] - indptr[rows]
    take = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]) if len(rows) else np.zeros(0, np.int64)
    c = indices[take].astype(np.int64)
    r = np.repeat(np.arange(len(rows)), lengths)
    width = n_items
    if cols is not None:
        where = np.full(n_items, -1, np.int64)
        where[cols] = np.arange(len(cols))
        c = where[c]
        r, c = r[c >= 0], c[c >= 0]
        width = len(cols)
    x = sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), width))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def binary_rows(csr: CSR, rows: np.ndarray, n_items: int) -> np.ndarray:
    """Dense 0/1 rows (users x items) of a CSR for the given users (small catalogs and tests)."""
    return binary_matrix(csr, rows, n_items).toarray()


def head_items(csr: CSR, n_items: int, size: int) -> np.ndarray:
    """The `size` items with the most users (ties: lower index first), ascending item order."""
    x = binary_matrix(csr, np.arange(len(csr[0]) - 1), n_items)
    counts = np.bincount(x.indices, minlength=n_items)
    if size >= n_items:
        return np.arange(n_items)
    return np.sort(np.argsort(-counts, kind="stable")[:size])


def gram(csr: CSR, n_items: int, cols: np.ndarray | None = None, dtype: Any = np.float64, block_bytes: int = 1 << 26) -> np.ndarray:
    """XᵀX of the binary user x item matrix restricted to `cols` (all items by default): dense
    len(cols)², filled block of columns by block from the sparse X (no dense X, no sparse n²)."""
    x = binary_matrix(csr, np.arange(len(csr[0]) - 1), n_items, cols)
    xt = x.T.tocsr()
    n = x.shape[1]
    g = np.empty((n, n), dtype)
    step = max(1, block_bytes // (8 * max(x.shape[0], 1)))
    xc = x.tocsc()
    for lo in range(0, n, step):
        g[:, lo : lo + step] = xt @ xc[:, lo : lo + step].toarray()
    return g


def ease_matrix(g: np.ndarray, lam: float) -> np.ndarray:
    """EASE's B from the Gram matrix g = XᵀX: zero diagonal, B = I - P diag(1/diag P), P = (g + λI)⁻¹
    (the textbook formula, for small matrices and tests; `ease_inplace` is what fitting uses)."""
    p = np.linalg.inv(g + lam * np.eye(len(g)))
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


def ease_inplace(g: np.ndarray, lam: float, block: int = 1024) -> np.ndarray:
    """`ease_matrix` computed inside `g` (float64, C-ordered, symmetric; overwritten and returned):
    Cholesky inverse (LAPACK potrf + potri) in place, so the only n² array is g itself."""
    if g.dtype != np.float64 or not g.flags.c_contiguous:
        raise ValueError("ease_inplace: a C-ordered float64 Gram matrix")
    n = len(g)
    g[np.diag_indices(n)] += lam
    f = g.T  # the same memory, Fortran-ordered (g is symmetric): LAPACK works on it in place
    c, info = scipy.linalg.lapack.dpotrf(f, lower=0, clean=0, overwrite_a=1)
    if info != 0 or not np.shares_memory(c, g):
        raise np.linalg.LinAlgError(f"EASE: the Gram matrix + lambda I is not positive definite (potrf info {info})")
    p, info = scipy.linalg.lapack.dpotri(c, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(p, g):
        raise np.linalg.LinAlgError(f"EASE: inverse failed (potri info {info})")
    # f's upper triangle = g's lower triangle holds P; mirror it into g's upper triangle block by block
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        d = g[lo:hi, lo:hi]
        d[np.triu_indices(hi - lo, 1)] = d.T[np.triu_indices(hi - lo, 1)]
        g[lo:hi, hi:] = g[hi:, lo:hi].T
    diag = np.diag(g).copy()
    g /= -diag[None, :]
    g[np.diag_indices(n)] = 0.0
    return g


def factorize(b: np.ndarray, x: sp.spmatrix | None, rank: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """B ≈ P Qᵀ with P = B V, Q = V (H x k, orthonormal columns): V spans the top-k right singular
    subspace of X B (the users' EASE score vectors; `x` None: of B itself), found by randomized
    subspace iteration (Halko et al. 2011) with a fixed seed. rank None or >= H: exact, V = I."""
    n = len(b)
    if rank is None or rank >= n:
        return b, np.eye(n), n
    rng = np.random.default_rng(seed)
    width = min(n, rank + max(16, rank // 4))  # oversampling
    y = np.linalg.qr(rng.standard_normal((n, width)))[0]

    def gram_apply(v: np.ndarray) -> np.ndarray:  # (X B)ᵀ (X B) v, or Bᵀ B v
        bv = b @ v
        return b.T @ (x.T @ (x @ bv) if x is not None else bv)

    for _ in range(POWER_ITERATIONS):
        y = np.linalg.qr(gram_apply(y))[0]
    bv = b @ y
    small = y.T @ gram_apply(y)  # the l x l restriction: its top eigenvectors rotate y onto the top-k subspace
    w, vecs = np.linalg.eigh((small + small.T) / 2)
    v = y @ vecs[:, np.argsort(-w)[:rank]]
    return bv @ (y.T @ v), v, rank


def _padded_cov(q_head: np.ndarray, n_items: int) -> np.ndarray:
    """Population covariance over n_items rows of a matrix that is q_head on the head, 0 elsewhere."""
    mean = q_head.sum(0) / n_items
    return q_head.T @ q_head / n_items - np.outer(mean, mean)


def _scale(vectors: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """1 / the std of each row's scores over the catalog (0 where a row scores everything alike)."""
    sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", vectors, cov, vectors), 0.0))
    return np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > SD_FLOOR)


def blend_scores(tower: np.ndarray, ease: np.ndarray, a: float) -> np.ndarray:
    """The blend by its formula from dense users x items score matrices (what `EaseBlend.user_vectors`
    reproduces as a dot product); a user whose scores are all alike gets 0 from that model."""
    sd = lambda s: np.where(s.std(1, keepdims=True) > SD_FLOOR, s.std(1, keepdims=True), np.inf)  # noqa: E731
    return a * tower / sd(tower) + (1 - a) * ease / sd(ease)


@dataclass
class EaseBlend:
    """A fitted blend: weight `a` of the two-tower, EASE's λ, the head items, B_head's rank-k
    factors (head rows only) and the item-side covariances the per-user scales need."""

    weight: float
    lam: float
    rank: int
    n_items: int
    head: np.ndarray  # the head's item indices (H,), ascending
    user_factors: np.ndarray  # P (H x k): z_u = x_u[head] P
    item_factors: np.ndarray  # Q (H x k): E_u(i) ≈ z_u · Q[i] on the head, 0 on the tail
    tower_cov: np.ndarray  # Cov over items of the two-tower item vectors (d x d)
    ease_cov: np.ndarray  # Cov over all n_items of Q's rows, tail rows 0 (k x k)
    genre_weight: float = 0.0  # α: each genre a pseudo-user of weight α in EASE's Gram (0: plain EASE)

    def item_vectors(self, tower_items: np.ndarray) -> np.ndarray:
        out = np.zeros((self.n_items, tower_items.shape[1] + self.rank), np.float32)
        out[:, : tower_items.shape[1]] = tower_items
        out[self.head, tower_items.shape[1] :] = self.item_factors
        return out

    def head_rows(self) -> np.ndarray:
        """Item index -> row of `user_factors`, H (one past the last row) for tail items (int64, n_items)."""
        rows = np.full(self.n_items, len(self.head), np.int64)
        rows[self.head] = np.arange(len(self.head))
        return rows

    def ease_part(self, history: Any) -> np.ndarray:
        """z_u for binary histories (users x n_items, scipy sparse or dense)."""
        if sp.issparse(history):
            history = history.tocsc()
        return np.asarray(history[:, self.head] @ self.user_factors.astype(np.float64))

    def user_vectors(self, tower_users: np.ndarray, history: Any) -> np.ndarray:
        """[a·u/sd_T(u), (1-a)·z_u/sd_E(u)] for users' tower vectors and binary histories (users x items)."""
        z = self.ease_part(history)
        left = self.weight * tower_users * _scale(tower_users, self.tower_cov)[:, None]
        right = (1 - self.weight) * z * _scale(z, self.ease_cov)[:, None]
        return np.concatenate([left, right], axis=1).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What the manifest and MLflow record (no matrices)."""
        return {"kind": "ease", "weight": self.weight, "lambda": self.lam, "genre_weight": self.genre_weight, "rank": self.rank, "head_items": int(len(self.head))}


def genre_matrix(genres: Sequence[Sequence[int]], n_genres: int) -> sp.csr_matrix | None:
    """The binary item x genre matrix F (row i: item i's genre ids, `Dataset.items.genres`); None
    where no item has a genre."""
    rows = np.repeat(np.arange(len(genres)), [len(g) for g in genres])
    cols = np.fromiter((c for g in genres for c in g), np.int64, count=len(rows))
    f = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(genres), n_genres))
    f.sum_duplicates()
    f.data[:] = 1.0
    return f if f.nnz else None


def add_genres(g: np.ndarray, f_head: sp.spmatrix | None, alpha: float, block: int = 1024) -> np.ndarray:
    """g += α² F Fᵀ in place (F: the head's item x genre rows): collective EASE (Jeunen et al. 2020),
    each genre a pseudo-user who rated its items with weight α; row blocks, never a second H x H array."""
    if f_head is None or alpha == 0:
        return g
    ft = sp.csr_matrix(f_head.T)
    for lo in range(0, len(g), block):
        g[lo : lo + block] += alpha**2 * np.asarray((f_head[lo : lo + block] @ ft).todense())
    return g


def head_factors(g: np.ndarray, lam: float, rank: int | None, x_head: sp.spmatrix, n_items: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(P, Q, k) of B_head (see the module doc) from the head's Gram `g` (overwritten), balanced so
    that Cov(Q) over the n_items rows has mean eigenvalue 1."""
    b = ease_inplace(g, lam)
    p, q, k = factorize(b, x_head, rank)
    del b
    c = np.sqrt(max(np.trace(_padded_cov(q, n_items)) / k, 1e-300))
    return p * c, q / c, k


def block_rows(n_items: int) -> int:
    """Users per score block: ~SCORE_BLOCK floats, between 1 and 1024 users."""
    return int(min(1024, max(1, SCORE_BLOCK // max(n_items, 1))))


def fit(weight: float, lam: float, rank: int | None, interactions: CSR, tower_items: np.ndarray, head_size: int,
        genres: sp.spmatrix | None = None, genre_weight: float = 0.0) -> EaseBlend:
    """The blend for the chosen (a, λ, α), EASE fitted on `interactions` (train + val for the final model)
    over its `head_size` most popular items; `genres` (item x genre, `genre_matrix`) weighted α."""
    n_items = len(tower_items)
    head = head_items(interactions, n_items, head_size)
    x = binary_matrix(interactions, np.arange(len(interactions[0]) - 1), n_items, head)
    g = add_genres(gram(interactions, n_items, head), genres[head] if genres is not None else None, genre_weight)
    p, q, k = head_factors(g, lam, rank, x, n_items)
    tower_cov = np.cov(np.asarray(tower_items, np.float64), rowvar=False, bias=True)
    return EaseBlend(weight, lam, k, n_items, head, p.astype(np.float32), q.astype(np.float32), np.atleast_2d(tower_cov),
                     _padded_cov(q.astype(np.float32).astype(np.float64), n_items), genre_weight if genres is not None else 0.0)  # fmt: skip


def choose(lambdas: list[float], weights: list[float], k: int, user_vec: np.ndarray, item_vec: np.ndarray, train: CSR, val: CSR,
           users: np.ndarray, head_size: int, rank: int | None, batch_size: int | None = None,
           genres: sp.spmatrix | None = None, genre_weights: list[float] = (0.0,)) -> tuple[float, float, float, float]:
    """(a, λ, α, the NDCG@k) with the best validation NDCG@k: both models fitted on train, train items
    excluded, EASE in the very form that is served (head, rank; `genres` weighted α from `genre_weights`,
    only 0 without genres). `user_vec` holds the two-tower vectors of `users` (those with validation items).
    Ties keep the earlier grid point (the smaller α, the earlier λ, the earlier a)."""
    n_items = len(item_vec)
    batch_size = batch_size or block_rows(n_items)
    head = head_items(train, n_items, head_size)
    x = binary_matrix(train, np.arange(len(train[0]) - 1), n_items, head)
    g32 = gram(train, n_items, head, np.float32)  # co-occurrence counts: exact in float32 below 2^24 users
    hist = binary_matrix(train, users, n_items, head)
    f_head = genres[head] if genres is not None else None
    alphas = list(dict.fromkeys(genre_weights)) if f_head is not None else [0.0]
    best = (-1.0, weights[0], lambdas[0], alphas[0])
    for alpha, lam in ((alpha, lam) for alpha in alphas for lam in lambdas):
        p, q, _ = head_factors(add_genres(g32.astype(np.float64), f_head, alpha), lam, rank, x, n_items)
        tops: dict[float, list[np.ndarray]] = {a: [] for a in weights}
        for start in range(0, len(users), batch_size):  # users x items score blocks, not all at once
            batch = users[start : start + batch_size]
            tower = user_vec[start : start + batch_size] @ item_vec.T
            ease = np.zeros((len(batch), n_items))
            ease[:, head] = (hist[start : start + batch_size] @ p) @ q.T
            for a in weights:
                tops[a].append(evaluation.topk_from_scores(blend_scores(tower, ease, a), k, exclude=train[:2], exclude_rows=batch))
        for a in weights:
            ndcg = evaluation.ranking_metrics(np.concatenate(tops[a]), val[:2], users, k, n_items)[f"ndcg@{k}"]
            if ndcg > best[0]:
                best = (ndcg, a, lam, alpha)
    log.info("blend.ease: validation NDCG@%d %.4f at a=%g, lambda=%g, genre weight=%g", k, *best)
    return best[1], best[2], best[3], best[0]
