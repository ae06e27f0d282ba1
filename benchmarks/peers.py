"""Peer recommenders for the quality benchmark, scored by the same metric code as our model.

    python benchmarks/peers.py                      # all peers on ML-100k, MS Recommenders protocol
    python benchmarks/peers.py --names ease,als --fast
    python benchmarks/peers.py --data ml1m-implicit  # any --data of features/sources.py (csv:PATH, lines:PATH, ...)
    python benchmarks/peers.py --names popularity,ease --record   # the figure of record (docs/RESULTS.md)

Every peer implements the tiny `Peer` interface (fit on a CSR over users, return a dense
(users, n_items) float32 score matrix), so `training.evaluation.evaluate_scores` ranks all
items, drops the user's history and computes NDCG/P/R/MAP exactly as for the two-tower model.

Protocol (`run_peers`): a peer with a hyper-parameter grid is tuned on validation (fit on
`prepared.train`, NDCG@k on `prepared.val`, train items excluded), the best point is refitted
on `prepared.seen` (= train + val, the whole 75 % MS training share) and evaluated once on
`prepared.test` with `seen` excluded. `fit_s` is the wall time of that final fit only. `main`
prints a table and writes JSON (default benchmarks/results/peers_<label>_<protocol>[_fast].json, the
label naming the dataset as in quality.py), each peer's refitted hyper-parameters (`params`) included.

Conventions shared by the learned peers:

- users with no training interaction, or outside [0, n_users), score all zeros (cold start);
- items with no training interaction rank below every item the model saw (row minimum - 1),
  like Microsoft Recommenders, which only ranks items present in the training data. Models
  would otherwise give them arbitrary scores (BPR: random init, BiVAE: sigmoid(0) = 0.5).

Numpy / scipy only at import time; cornac, implicit and torch are imported when a peer that
needs them is fitted. This file does not import `training.pipeline` (torch / torchrec) except
in `main`, so the tests stay light. NB: opacus installs a top-level package named
`benchmarks`, which shadows this folder for `import benchmarks.peers`; import it as `peers`
from a script in this folder, or load it by path (the tests do).
"""
from __future__ import annotations

import inspect
import itertools
import os
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (stdlib only; puts the repository on sys.path too)
from training.evaluation import as_csr, evaluate_scores  # noqa: E402  (numpy only)

CSR = tuple[np.ndarray, np.ndarray]  # (indptr, indices) over users, like training.evaluation

SEED = 42


def pair(csr: Any) -> CSR:
    """(indptr, indices) of a CSR pair, a rated triple (indptr, indices, ratings) or a scipy CSR.

    Peers are fitted on binary interactions (the MS Recommenders BPR / BiVAE runs treat
    every rating as a positive; cornac's BiVAE binarizes anyway), so ratings are dropped.
    """
    return as_csr(csr if hasattr(csr, "indptr") and hasattr(csr, "indices") else tuple(csr)[:2])


class Peer(Protocol):
    name: str

    def fit(self, train: CSR, n_users: int, n_items: int) -> None: ...

    def scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) float32."""
        ...


def to_scipy(train: Any, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item scipy CSR (ones) from a CSR pair or scipy-like object."""
    indptr, indices = pair(train)
    if len(indptr) != n_users + 1:
        raise ValueError(f"train CSR has {len(indptr) - 1} rows, expected n_users={n_users}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise ValueError(f"item index out of range for n_items={n_items}")
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n_users, n_items))


class _Base:
    """Bookkeeping shared by all peers: shapes, cold users, items unseen in training."""

    name = "peer"

    def _remember(self, train: Any, n_users: int, n_items: int) -> sp.csr_matrix:
        x = to_scipy(train, n_users, n_items)
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.known_users = np.diff(x.indptr) > 0
        self.known_items = np.bincount(x.indices, minlength=n_items) > 0
        return x

    def _raw(self, users: np.ndarray) -> np.ndarray:
        """Scores of known, in-range users: (len(users), n_items)."""
        raise NotImplementedError

    def scores(self, users: np.ndarray) -> np.ndarray:
        if not hasattr(self, "known_users"):
            raise RuntimeError(f"{self.name}: call fit() before scores()")
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        out = np.zeros((len(users), self.n_items), dtype=np.float32)
        in_range = (users >= 0) & (users < self.n_users)
        warm = np.zeros(len(users), dtype=bool)
        warm[in_range] = self.known_users[users[in_range]]
        if warm.any():
            raw = np.asarray(self._raw(users[warm]), dtype=np.float32)
            if not self.known_items.all() and self.known_items.any():
                floor = raw[:, self.known_items].min(axis=1, keepdims=True) - 1.0
                raw = np.where(self.known_items[None, :], raw, floor)
            out[warm] = raw
        return out


class Popularity(_Base):
    """Number of training users per item, the same for every user (ties: lower item index)."""

    name = "popularity"

    def fit(self, train: CSR, n_users: int, n_items: int) -> None:
        x = self._remember(train, n_users, n_items)
        self.counts = np.bincount(x.indices, minlength=n_items).astype(np.float32)

    def scores(self, users: np.ndarray) -> np.ndarray:
        # Unlike the learned peers, popularity needs no history: cold users get the same list.
        if not hasattr(self, "counts"):
            raise RuntimeError("popularity: call fit() before scores()")
        return np.tile(self.counts, (np.size(users), 1))


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE (Steck 2019) item-item weights from a Gram matrix: P = (gram + λI)⁻¹, B = I − P·diag(1/diag P),
    i.e. B_ij = −P_ij / P_jj off the diagonal and B_jj = 0. `gram` must be PSD (λ > 0 then makes the
    system positive definite; Cholesky solve). Scores of a user with history row x: x @ B."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    a = np.array(gram, dtype=np.float64, copy=True)
    a[np.diag_indices_from(a)] += lam
    p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True), np.eye(len(a)))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


class EASE(_Base):
    """Embarrassingly Shallow Autoencoder (Steck, WWW 2019), closed form.

    G = XᵀX + λI, P = G⁻¹, B = -P / diag(P) (column j divided by P_jj), diag(B) = 0;
    scores = X_u B. G is symmetric positive definite, so P comes from a Cholesky solve.
    """

    name = "ease"

    def __init__(self, lam: float = 200.0):
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = float(lam)

    def fit(self, train: CSR, n_users: int, n_items: int) -> None:
        x = self._remember(train, n_users, n_items).astype(np.float64)
        self.B = ease_weights((x.T @ x).toarray(), self.lam).astype(np.float32)
        self.X = x.astype(np.float32).tocsr()

    def _raw(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.X[users] @ self.B)


def cornac_dataset(train: Any, n_users: int, n_items: int, seed: int | None = SEED):
    """cornac Dataset of (user, item, 1.0) triplets whose internal indices ARE our indices.

    Identity global uid/iid maps (pre-filled, so `setdefault` never renumbers) make
    `model.score(u)` row u and column i mean our user u / item i; the matrix is
    n_users x n_items even when some users or items have no interaction.
    """
    from cornac.data import Dataset

    coo = to_scipy(train, n_users, n_items).tocoo()
    triplets = list(zip(coo.row.tolist(), coo.col.tolist(), [1.0] * coo.nnz))
    uid_map = OrderedDict((u, u) for u in range(n_users))
    iid_map = OrderedDict((i, i) for i in range(n_items))
    ds = Dataset.build(triplets, fmt="UIR", global_uid_map=uid_map, global_iid_map=iid_map, seed=seed)
    assert ds.num_users == n_users and ds.num_items == n_items
    return ds


class _Cornac(_Base):
    """Wraps a cornac Recommender (the class `_model()` gives, made with `params`); scores come from its
    own `score(user_idx)` (all items)."""

    def __init__(self, **params: Any):
        self.params, self.seed = params, params["seed"]

    def _model(self) -> type:
        raise NotImplementedError

    def fit(self, train: CSR, n_users: int, n_items: int) -> None:
        self._remember(train, n_users, n_items)
        self.model = self._model()(**self.params, verbose=False)  # fresh model: cornac BPR draws its init from an RNG made in __init__
        self.model.fit(cornac_dataset(train, n_users, n_items, self.seed))

    def _raw(self, users: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.model.score(int(u)), dtype=np.float32) for u in users])


class CornacBPR(_Cornac):
    """cornac 3 BPR. Defaults = `bpr_params` of Microsoft Recommenders' benchmark notebook
    (examples/06_benchmarks/movielens.ipynb), the run behind their published ML-100k row
    (NDCG@10 0.442): k=200, max_iter=200, learning_rate=0.01, lambda_reg=0.001, seed 42.
    Their cornac_bpr_deep_dive uses max_iter=100 instead, which here gives NDCG@10 ≈ 0.415.
    """

    name = "bpr"

    def __init__(self, k: int = 200, max_iter: int = 200, learning_rate: float = 0.01, lambda_reg: float = 0.001, seed: int | None = SEED):
        super().__init__(k=k, max_iter=max_iter, learning_rate=learning_rate, lambda_reg=lambda_reg, seed=seed)

    def _model(self) -> type:
        from cornac.models import BPR

        return BPR  # with a seed cornac trains single-threaded (deterministic), whatever num_threads says


class CornacBiVAE(_Cornac):
    """cornac 3 BiVAECF (torch). Defaults = `bivae_params` of Microsoft Recommenders' benchmark
    notebook, the run behind their published ML-100k row (NDCG@10 0.475): k=100,
    encoder_structure=[200], tanh, Poisson likelihood, 500 epochs, batch_size=1024, lr 0.001.
    Their cornac_bivae_deep_dive uses k=50, [100], batch_size=128 (here: NDCG@10 ≈ 0.485).

    cornac binarizes the training matrix itself; scores are sigmoid(theta_u · beta_i).
    """

    name = "bivae"

    def __init__(self, k: int = 100, encoder_structure: Sequence[int] = (200,), act_fn: str = "tanh", likelihood: str = "pois", n_epochs: int = 500,
                 batch_size: int = 1024, learning_rate: float = 0.001, seed: int | None = SEED, use_gpu: bool = False, num_threads: int | None = 1):
        super().__init__(k=k, encoder_structure=list(encoder_structure), act_fn=act_fn, likelihood=likelihood, n_epochs=n_epochs,
                         batch_size=batch_size, learning_rate=learning_rate, seed=seed, use_gpu=use_gpu)  # fmt: skip
        # torch intra-op threads during fit / scores (restored after); None: leave torch's setting.
        # 1 by default: the batches are small, and on a busy 2-core box 2 threads ran ~10x slower.
        self.num_threads = num_threads

    def fit(self, train: CSR, n_users: int, n_items: int) -> None:
        with _torch_threads(self.num_threads):
            super().fit(train, n_users, n_items)

    def _model(self) -> type:
        from cornac.models import BiVAECF

        return BiVAECF

    def _raw(self, users: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad(), _torch_threads(self.num_threads):
            return super()._raw(users)


@contextmanager
def _torch_threads(n: int | None):
    """Temporarily run torch with n intra-op threads (restored afterwards); None: no change."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ImplicitALS(_Base):
    """implicit 0.7 weighted ALS (Hu, Koren, Volinsky 2008) with confidence 1 + alpha·r, r = 1.

    implicit uses the CSR values as the confidence C_ui itself (and would multiply them by its
    own `alpha`), so we pass 1 + alpha·r and keep implicit's alpha at 1. Threads: `num_threads`
    for implicit's solver (default: all cores) and BLAS pinned to 1 thread during the fit.
    """

    name = "als"

    def __init__(self, factors: int = 128, regularization: float = 0.1, alpha: float = 10.0, iterations: int = 15, seed: int | None = SEED, num_threads: int | None = None):
        self.factors, self.regularization, self.alpha, self.iterations, self.seed = factors, regularization, alpha, iterations, seed
        self.num_threads = num_threads if num_threads is not None else (os.cpu_count() or 1)

    def fit(self, train: CSR, n_users: int, n_items: int) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        x = self._remember(train, n_users, n_items)
        confidence = x.copy()
        confidence.data = (1.0 + self.alpha * confidence.data).astype(np.float32)
        with threadpool_limits(limits=1, user_api="blas"):  # implicit checks BLAS threads in __init__
            model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization, alpha=1.0, iterations=self.iterations,
                                            calculate_training_loss=False, num_threads=self.num_threads, random_state=self.seed)
            model.fit(confidence, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def _raw(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


# --------------------------------------------------------------------------- tuning / runs


def _fit_evaluate(peer: Peer, prepared: Any, fit_on: Any, truth: Any, k: int) -> dict[str, Any]:
    """Fit `peer` on `fit_on` (timed: "fit_s"), then its metrics on the users of `truth`, `fit_on` excluded."""
    n_users, n_items = int(prepared.dataset.n_users), int(prepared.dataset.n_items)
    fit_on, truth = pair(fit_on), pair(truth)
    started = time.perf_counter()
    peer.fit(fit_on, n_users, n_items)
    fit_s = time.perf_counter() - started
    return {**evaluate_scores(peer.scores, harness.users_with(truth), fit_on, truth, n_items, k=k), "fit_s": fit_s}


def tune(peer_factory: Callable[..., Peer], grid: list[dict[str, Any]], prepared: Any, k: int = 10
         ) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Grid search on validation: fit on `prepared.train`, NDCG@k on `prepared.val` (train excluded).

    Returns (best_params, best_val_ndcg, table); table has one row per grid point, in grid
    order: {"params", "ndcg@k", "precision@k", "recall@k", "map@k", "coverage", "fit_s"}.
    Ties keep the earlier grid point. The caller refits the best on `prepared.seen`.
    """
    if not grid:
        raise ValueError("grid is empty")
    table, best = [], None
    for params in grid:
        metrics = _fit_evaluate(peer_factory(**params), prepared, prepared.train, prepared.val, k)
        table.append({"params": dict(params), **metrics})
        if best is None or metrics[f"ndcg@{k}"] > table[best][f"ndcg@{k}"]:
            best = len(table) - 1
    return dict(table[best]["params"]), float(table[best][f"ndcg@{k}"]), table


def _grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, first axis slowest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# 600: its validation best on ML-100k (the blend grid found it); up to 3,200 as trustrec's generic blend grid
# (configs/two_tower_ease.yaml), since ML-1M implicit chose the old edge, 800
EASE_GRID = _grid(lam=[50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1600.0, 3200.0])
# ML-1M implicit chose the old edges (64 factors, alpha 1): 32 factors and alpha 0.3 added
ALS_GRID = _grid(factors=[32, 64, 128], regularization=[0.01, 0.1], alpha=[0.3, 1.0, 10.0], iterations=[15])

# name -> (factory, fixed params, grid or None); fast: small, quick settings for tests
PEERS: dict[str, tuple[Callable[..., Peer], dict[str, Any], list[dict[str, Any]] | None]] = {
    "popularity": (Popularity, {}, None),
    "ease": (EASE, {}, EASE_GRID),
    "bpr": (CornacBPR, {}, None),  # MS Recommenders hyper-parameters, not tuned
    "bivae": (CornacBiVAE, {}, None),  # idem
    "als": (ImplicitALS, {}, ALS_GRID),
}
FAST: dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None]] = {
    "popularity": ({}, None),
    "ease": ({}, _grid(lam=[10.0, 100.0])),
    "bpr": ({"k": 32, "max_iter": 30, "learning_rate": 0.05}, None),
    "bivae": ({"k": 10, "encoder_structure": [20], "n_epochs": 30, "batch_size": 64, "learning_rate": 0.01}, None),
    "als": ({}, _grid(factors=[16], regularization=[0.1], alpha=[1.0, 10.0], iterations=[5])),
}


def _effective(factory: Callable[..., Peer], params: dict[str, Any]) -> dict[str, Any]:
    """All constructor arguments, defaults filled in (tuples as lists, JSON-friendly)."""
    bound = inspect.signature(factory).bind_partial(**params)
    bound.apply_defaults()
    return {key: list(v) if isinstance(v, tuple) else v for key, v in bound.arguments.items()}


def run_peers(prepared: Any, k: int = 10, names: Sequence[str] = ("popularity", "ease", "bpr", "bivae", "als"), fast: bool = False,
              seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Tune (if the peer has a grid) on train -> val, refit on seen, evaluate on test.

    `prepared` needs .train, .val, .seen, .test CSRs (pairs or rated triples) and
    .dataset.n_users / .n_items (training.pipeline.Prepared). Returns {name: {ndcg@k,
    precision@k, recall@k, map@k, coverage, "fit_s" (final fit on seen), "params" (every
    constructor argument of the refitted peer, defaults included), and for tuned peers
    "val_ndcg@k" (the winning validation NDCG)}}. `seed` (when given) replaces the default seed
    of the peers that take one (bpr, bivae, als), for multi-seed tables; the others are deterministic.
    """
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {list(PEERS)}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        factory, fixed, grid = PEERS[name]
        if fast:
            fixed, grid = FAST[name]
        if seed is not None and "seed" in inspect.signature(factory).parameters:
            fixed = {**fixed, "seed": seed}
        params, extra = dict(fixed), {}
        if grid:
            best, val_ndcg, _ = tune(lambda **p: factory(**{**fixed, **p}), grid, prepared, k=k)
            params.update(best)
            extra[f"val_ndcg@{k}"] = val_ndcg
        params = _effective(factory, params)
        metrics = _fit_evaluate(factory(**params), prepared, prepared.seen, prepared.test, k)
        fit_s = metrics.pop("fit_s")
        results[name] = {**metrics, **extra, "fit_s": fit_s, "params": params}
    return results


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "peers_<label>_<protocol>[_fast]")
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH], ml1m-implicit[:PATH], table:CONFIG.yaml, csv:PATH, lines:PATH or synthetic (a bare folder: ml100k:FOLDER)")
    p.add_argument("--protocol", choices=list(harness.PROTOCOLS), default=None, help="split protocol (default: given for a dataset shipped with its test part, else stratified)")
    p.add_argument("--names", default=",".join(PEERS), help="comma-separated peers")
    p.add_argument("--fast", action="store_true", help="small grids / few iterations (smoke run)")
    args = p.parse_args(argv)
    spec = f"ml100k:{args.data}" if Path(args.data).is_dir() else args.data  # --data FOLDER meant ML-100k before specs
    data = harness.dataset(p, spec, harness.ALL_KINDS, source=True)
    if data is None:
        return 2
    protocol = harness.protocol(p, data, args.protocol)
    config = "two_tower_ml100k.yaml" if data.kind == "ml100k" else "two_tower.yaml"  # only its data, split and eval_k are used
    overrides = [*data.overrides, f"split.protocol={protocol}", "tracking.enabled=false", "store.load=false"]
    if (loaded := harness.load(harness.CONFIGS / config, overrides, f"peers.py: error: --data {args.data}", prepare=True)) is None:
        return 2
    cfg, prepared = loaded
    k = cfg.task.eval_k
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    results = run_peers(prepared, k=k, names=names, fast=args.fast)

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage", "fit_s"]
    print(f"\n{data.name} / {protocol}, {os.cpu_count()} cores" + (" (fast)" if args.fast else ""))
    print(harness.table(["peer", *cols], [[name, *(r[c] for c in cols)] for name, r in results.items()], first=12))
    report = {"dataset": data.name, "data": harness.data_report(data, prepared), "protocol": protocol, "k": k, "fast": args.fast, "peers": results}
    name = f"peers_{data.name}_{protocol}" + ("_fast" if args.fast else "")
    print(f"wrote {harness.write(report, args, name, script=__file__, argv=argv, libraries=['scipy', 'cornac', 'implicit', 'torch'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
