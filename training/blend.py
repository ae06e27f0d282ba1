"""EASE blend (`blend.ease`): a closed-form item-item model added to the trained two-tower, served
as one dot product.

EASE (Steck 2019) learns a full-rank item-item matrix B = I - P diag(1/diag P), P = (XᵀX + λI)⁻¹,
from the binary user x item matrix X in closed form. A low-rank two-tower and EASE make different
errors, and their per-user-scaled sum ranks better than either:

    s_u(i) = a · T_u(i) / sd_T(u) + (1 - a) · E_u(i) / sd_E(u),   T_u(i) = u·v_i,  E_u(i) = x_u B[:, i],

with sd_·(u) the population std of the user's scores over the catalog. It is the dot product of

    user [a·u / sd_T(u),  (1 - a)·z_u / sd_E(u)]   and   item [v_i,  Q_i],   z_u = x_u P_k,

where B ≈ P_k Q_kᵀ is B's rank-k SVD, sd_T(u)² = u Cov(v) uᵀ and sd_E(u)² = z_u Cov(Q) z_uᵀ: the user
half is an ONNX graph (one more history bag, `training.export.EaseBlendArch`), the item half is precomputed, and
serving needs no change but the wider vectors. (a, λ) are chosen on validation with the models fitted
on train (`choose`); B is then refitted on train + val (`build`).

ML-100k, MS protocol: 0.4960 ± 0.0010 full rank (`configs/two_tower_ease_ml100k.yaml`) vs 0.4737 for the
two-tower alone. B is n_items x n_items: meant for catalogs of thousands of items (MAX_ITEMS), not millions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from training import evaluation
from training.data import CSR

log = logging.getLogger(__name__)

MAX_ITEMS = 10_000  # B is dense n_items², its inverse and SVD O(n_items³): 10k items = 0.8 GB and minutes
SD_FLOOR = 1e-6  # a per-user score std below this: the user gets 0 from that model (e.g. no history)


def binary_rows(csr: CSR, rows: np.ndarray, n_items: int) -> np.ndarray:
    """Dense 0/1 rows (users x items) of a CSR for the given users."""
    indptr, indices = csr[0], csr[1]
    lengths = indptr[rows + 1] - indptr[rows]
    cols = indices[np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows])] if len(rows) else np.zeros(0, np.int64)
    x = np.zeros((len(rows), n_items), np.float64)
    x[np.repeat(np.arange(len(rows)), lengths), cols] = 1.0
    return x


def gram(csr: CSR, n_items: int) -> np.ndarray:
    """XᵀX of the binary user x item matrix (items x items, dense), without a dense X."""
    indptr, indices = csr[0], csr[1]
    x = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(indptr) - 1, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0  # a repeated (user, item) counts once
    return (x.T @ x).toarray()


def ease_matrix(g: np.ndarray, lam: float) -> np.ndarray:
    """EASE's B from the Gram matrix g = XᵀX: zero diagonal, B = I - P diag(1/diag P), P = (g + λI)⁻¹."""
    p = np.linalg.inv(g + lam * np.eye(len(g)))
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


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
    """A fitted blend: weight `a` of the two-tower, EASE's λ, B's rank-k factors and the item-side
    covariances the per-user scales need."""

    weight: float
    lam: float
    rank: int
    user_factors: np.ndarray  # P_k (n_items x k): z_u = x_u P_k
    item_factors: np.ndarray  # Q_k (n_items x k): E_u(i) ≈ z_u · Q_k[i]
    tower_cov: np.ndarray  # Cov over items of the two-tower item vectors (d x d)
    ease_cov: np.ndarray  # Cov over items of Q_k's rows (k x k)

    def item_vectors(self, tower_items: np.ndarray) -> np.ndarray:
        return np.concatenate([tower_items, self.item_factors], axis=1).astype(np.float32)

    def user_vectors(self, tower_users: np.ndarray, history: np.ndarray) -> np.ndarray:
        """[a·u/sd_T(u), (1-a)·z_u/sd_E(u)] for users' tower vectors and binary histories (users x items)."""
        z = history @ self.user_factors
        left = self.weight * tower_users * _scale(tower_users, self.tower_cov)[:, None]
        right = (1 - self.weight) * z * _scale(z, self.ease_cov)[:, None]
        return np.concatenate([left, right], axis=1).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What the manifest and MLflow record (no matrices)."""
        return {"kind": "ease", "weight": self.weight, "lambda": self.lam, "rank": self.rank}


def factorize(b: np.ndarray, rank: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """B ≈ P Qᵀ from B's SVD, P = U_k S_k, Q = V_k; rank None or >= n_items: exact (k = n_items)."""
    u, s, vt = np.linalg.svd(b)
    k = len(s) if rank is None else min(rank, len(s))
    return u[:, :k] * s[:k], vt[:k].T, k


def fit(weight: float, lam: float, rank: int | None, interactions: CSR, tower_items: np.ndarray) -> EaseBlend:
    """The blend for the chosen (a, λ), EASE fitted on `interactions` (train + val for the final model)."""
    n_items = len(tower_items)
    check_size(n_items)
    p, q, k = factorize(ease_matrix(gram(interactions, n_items), lam), rank)
    return EaseBlend(weight, lam, k, p.astype(np.float32), q.astype(np.float32), np.cov(tower_items, rowvar=False, bias=True), np.cov(q, rowvar=False, bias=True))


def check_size(n_items: int) -> None:
    if n_items > MAX_ITEMS:
        raise ValueError(f"blend.ease: {n_items} items; EASE's dense item x item matrix is for catalogs up to {MAX_ITEMS}")


def choose(lambdas: list[float], weights: list[float], k: int, user_vec: np.ndarray, item_vec: np.ndarray,
           train: CSR, val: CSR, users: np.ndarray, batch_size: int = 1024) -> tuple[float, float, float]:
    """(a, λ, its NDCG@k) with the best validation NDCG@k: both models fitted on train, train items
    excluded. `user_vec` holds the two-tower vectors of `users` (those with validation items)."""
    n_items = len(item_vec)
    check_size(n_items)
    g = gram(train, n_items)
    best = (-1.0, weights[0], lambdas[0])
    for lam in lambdas:
        b = ease_matrix(g, lam)
        tops: dict[float, list[np.ndarray]] = {a: [] for a in weights}
        for start in range(0, len(users), batch_size):  # users x items score blocks, not all at once
            batch = users[start : start + batch_size]
            tower, ease = user_vec[start : start + batch_size] @ item_vec.T, binary_rows(train, batch, n_items) @ b
            for a in weights:
                tops[a].append(evaluation.topk_from_scores(blend_scores(tower, ease, a), k, exclude=train[:2], exclude_rows=batch))
        for a in weights:
            ndcg = evaluation.ranking_metrics(np.concatenate(tops[a]), val[:2], users, k, n_items)[f"ndcg@{k}"]
            if ndcg > best[0]:
                best = (ndcg, a, lam)
    log.info("blend.ease: validation NDCG@%d %.4f at a=%g, lambda=%g", k, *best)
    return best[1], best[2], best[0]
