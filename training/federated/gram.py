"""Federated EASE (`federated.strategy: gram`): the item Gram matrix summed over Flower clients,
EASE on the server, exported as the DP-EASE bundle is.

EASE needs one statistic of the users, G = Σ_u w_u x_u x_uᵀ (items x items), and G is a sum over
users, so clients can compute their own part and the server only adds them up: one pass over the
clients (each trains exactly once, in cohorts of `sampled_clients` per round, ceil(clients / cohort)
rounds), no model is sent down and nothing iterates. The server then fits EASE as centralized
training does, so without DP the federated model equals centralized EASE on the same data
(`test_federated_gram.py` checks it to float precision).

What a client sends. A one-user client (`partition: user`, cross-device) sends its user's item set
(train + validation, distinct item indices) and the server adds w·x xᵀ itself: the Gram part of one
user determines the item set (its diagonal) and the set determines the part, so the server learns
exactly what it did from the part, in |x| integers instead of |x|(|x|+1)/2 triples (ML-1M: 6.6 KB
instead of 22 MB for the heaviest user). A client holding several users (`silos`) sends the upper
triangle (diagonal included) of its users' summed contribution Σ_{u in client} w_u x_u x_uᵀ as
(row, col, value) arrays, which reveals less than their item sets. Interactions, user indices and
side features stay on the device. So the server is trusted with the messages, as in Flower's
central DP without secure aggregation (`secagg` is refused: SecAgg+ masks dense vectors of one
shape, and a dense n_items² message per device is 55 MB on ML-1M). What leaves the server is the model, and under DP that is
covered by (ε, δ).

Weights w_u: without DP 1 (x binary: the centralized EASE Gram XᵀX). With `federated.dp`,
w_u = 1 / |x_u|, i.e. each user's row scaled to unit L2 norm as DP-EASE does
(training/privacy/gram.py): one user's part then has Frobenius norm exactly 1, and the server
enforces it: from an item set it builds the unit part itself (norm 1 whatever the device sends), and
it scales any silo's contribution whose Frobenius norm exceeds the number of users it reports down to
that bound, so one user changes the sum by at most 1 even if their device misbehaves. After the last
round the server adds the Gaussian noise of the analytic Gaussian mechanism at sensitivity 1 once,
σ = `gaussian_sigma(federated.target_epsilon, δ)` (δ = `federated.dp_delta` or 1 / clients), and
everything after is post-processing of that release with the DP-EASE rules (λ, popularity prior,
rank: the `privacy.gram_*` keys). With one-user clients the server also sums their unit rows into
the popularity vector and, where `privacy.gram_popularity_share` (or its rule) gives a share, releases
it with the Gram as centralized DP-EASE does (the same joint Gaussian mechanism at σ). One release,
no composition: user-level (ε, δ)-DP, the same guarantee and accountant as centralized DP-EASE,
with the server trusted to add the noise.

λ: `privacy.gram_lambda` when set; else under DP the public-constant rule of DP-EASE; else (no DP)
chosen on validation over `federated.gram_lambdas`: clients also send the Gram of their train items
alone, and the server scores every validation user with each candidate (`evaluation: server`: the
simulation reads the validation split centrally, as the two-tower's server-side evaluation does).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from training import blend, evaluation
from training.config import ConfigError, TrainConfig
from training.data import CSR
from training.federated.partition import ClientData, read_client_data, write_client_store
from training.federated.server import sampled_clients
from training.privacy.gram import ACCOUNTANT, CLIPPING, GramEase, ease_from_release, gaussian_epsilon, gaussian_sigma, release_rules, release_statistic
from training.trainer import FitResult

log = logging.getLogger(__name__)

KIND = "ease_federated"  # the manifest's model.kind and the MLflow `model` tag
MECHANISM = "gaussian gram release (federated ease), user-level, noise added by the server"


def check(cfg: TrainConfig) -> None:
    fed = cfg.federated
    if fed.secagg:
        raise ConfigError("federated.secagg: not with federated.strategy=gram (a client's Gram part is sparse; SecAgg+ masks dense vectors of one shape)")
    if fed.sampling == "poisson":
        raise ConfigError("federated.sampling: must be flower with federated.strategy=gram (every client sends its part exactly once)")
    if fed.target_epsilon is not None and not fed.dp:
        raise ConfigError("federated.target_epsilon: needs federated.dp=true")
    if cfg.privacy.gram_popularity_share and not (fed.dp and fed.partition == "user"):
        raise ConfigError("privacy.gram_popularity_share: with federated.strategy=gram only under federated.dp=true and federated.partition=user "
                          "(the server builds the popularity vector from one-user clients' item sets; silos send Gram parts only)")  # fmt: skip
    if cfg.privacy.gram_weight_power:
        raise ConfigError("privacy.gram_weight_power: not with federated.strategy=gram (each client would need the released weights before "
                          "sending its Gram part: a second round); set it to 0 or null")  # fmt: skip


# --------------------------------------------------------------------------- the client's part
def contribution(histories: list[CSR], users: np.ndarray, n_items: int, unit: bool) -> list[np.ndarray]:
    """[rows, cols, values] of the upper triangle (diagonal included) of Σ_u w_u x_u x_uᵀ over `users`,
    x_u the binary union of their rows in `histories` (w_u = 1, or 1/|x_u| when `unit`: unit L2 rows)."""
    x = sum(blend.binary_matrix(h, users, n_items) for h in histories)
    x = sp.csr_matrix(x, dtype=np.float64)
    x.data[:] = 1.0  # an item in train and val counts once
    if unit:
        norms = np.sqrt(np.diff(x.indptr)).astype(np.float64)
        x.data /= np.repeat(np.where(norms > 0, norms, 1.0), np.diff(x.indptr))
    upper = sp.triu(x.T @ x).tocoo()
    return [upper.row.astype(np.int32), upper.col.astype(np.int32), upper.data.astype(np.float64)]


def item_set(histories: list[CSR], user: int) -> np.ndarray:
    """The sorted, distinct items of one user over `histories` (int32): what a one-user client sends."""
    return np.unique(np.concatenate([h[1][h[0][user] : h[0][user + 1]] for h in histories])).astype(np.int32)


def frobenius(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> float:
    """‖A‖_F of the symmetric A whose upper triangle these arrays hold (off-diagonal entries count twice)."""
    weight = np.where(rows == cols, 1.0, 2.0)
    return float(math.sqrt(np.sum(weight * values * values)))


def make_gram_client_app(store: str, n_items: int, unit: bool):
    """ClientApp whose node plays the client named in each fit config (`client`): it loads that
    client's storage, nothing else, and replies with its part (train + val; plus train alone when
    the config asks, `train_too`): its item set when the config says `form: items` (one user), else
    the upper triangle of its users' Gram part."""
    from flwr.client import ClientApp, NumPyClient

    class _Client(NumPyClient):
        def fit(self, parameters, config):
            data = read_client_data(store, int(config["client"]))
            parts = [[data.train, data.val]] + ([[data.train]] if config.get("train_too") else [])
            if config.get("form") == "items":
                if len(data.users) != 1:
                    raise RuntimeError(f"federated gram: client {config['client']} holds {len(data.users)} users; form 'items' is for one-user clients")
                return [item_set(h, int(data.users[0])) for h in parts], 1, {}
            return [a for h in parts for a in contribution(h, data.users, n_items, unit)], len(data.users), {}

        def evaluate(self, parameters, config):
            return 0.0, 0, {}

    return ClientApp(client_fn=lambda context: _Client().to_client())


# --------------------------------------------------------------------------- the server
class GramBook:
    """Server-side sums: the Gram of train + val (`seen`) and, when λ is chosen on validation, of train.

    One-user clients (`one_user`, partition: user) send their item set (`form: items`), and the
    server adds w·x xᵀ itself (w = 1, or 1/|x| under a `bound`: exactly Frobenius norm 1, so nothing
    needs clipping and a misbehaving device can send no other values). Other clients send the upper
    triangle of their part, which the server clips to `bound` times the users they hold."""

    def __init__(self, n_items: int, order: np.ndarray, cohort: int, bound: float | None, train_too: bool, progress: bool, one_user: bool = False):
        self.n_items, self.order, self.cohort, self.bound, self.train_too = n_items, order, cohort, bound, train_too
        self.one_user = one_user  # partition: user: every client holds one user, whatever it reports
        self.rounds = math.ceil(len(order) / cohort)
        self.seen = np.zeros((n_items, n_items))
        self.train = np.zeros((n_items, n_items)) if train_too else None
        # Σ x̂_u of train + val, the popularity vector DP-EASE may release beside the Gram: built from the
        # item sets of one-user clients under a bound (privacy.gram_popularity_share); else None
        self.vector = np.zeros(n_items) if one_user and bound is not None else None
        self.reported: set[int] = set()
        self.clipped = 0
        self.bar = tqdm(total=len(order), desc="federated gram (clients)", disable=not progress)

    def cohort_of(self, server_round: int) -> np.ndarray:
        return self.order[(server_round - 1) * self.cohort : server_round * self.cohort]

    @property
    def form(self) -> str:
        """What clients are asked to send: `items` (one-user clients) or `pairs`."""
        return "items" if self.one_user else "pairs"

    def add(self, client: int, arrays: list[np.ndarray], users: int) -> None:
        if client in self.reported:
            raise RuntimeError(f"federated gram: client {client} reported twice")
        self.reported.add(client)
        per = 1 if self.one_user else 3
        if len(arrays) != (2 * per if self.train_too else per):
            raise RuntimeError(f"federated gram: client {client} sent {len(arrays)} arrays, expected {2 * per if self.train_too else per}")
        targets = (self.seen, self.train) if self.train_too else (self.seen,)
        if self.one_user:
            for target, items in zip(targets, arrays):
                self.add_items(client, target, np.asarray(items), vector=target is self.seen)
            self.bar.update(1)
            return
        for target, (rows, cols, values) in zip(targets, (arrays[0:3], arrays[3:6])):
            rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
            if len(rows) and (rows.min() < 0 or cols.max() >= self.n_items or np.any(rows > cols)):
                raise RuntimeError(f"federated gram: client {client} sent entries outside the upper triangle of {self.n_items} items")
            values = np.asarray(values, np.float64)
            if self.bound is not None:  # server-side clipping: one user moves the sum by at most 1
                limit, norm = self.bound * (1 if self.one_user else max(users, 1)), frobenius(rows, cols, values)
                if norm > limit * (1 + 1e-9):
                    values = values * (limit / norm)
                    self.clipped += 1
            target[rows, cols] += values  # (row, col) pairs are unique within one client's COO
        self.bar.update(1)

    def add_items(self, client: int, target: np.ndarray, items: np.ndarray, vector: bool = False) -> None:
        """target += w·x xᵀ (upper triangle) of one user's item set, w = 1/|x| under a bound, else 1;
        with `vector`, also self.vector += x / √|x| (the user's unit row)."""
        if items.ndim != 1 or (len(items) and not np.issubdtype(items.dtype, np.integer)):
            raise RuntimeError(f"federated gram: client {client} sent a malformed item set")
        items = items.astype(np.int64)
        if len(items) and (items.min() < 0 or items.max() >= self.n_items):
            raise RuntimeError(f"federated gram: client {client} sent items outside 0..{self.n_items - 1}")
        if len(np.unique(items)) != len(items):
            raise RuntimeError(f"federated gram: client {client} sent an item twice")
        if not len(items):
            return
        items = np.sort(items)
        rows, cols = np.triu_indices(len(items))
        target[items[rows], items[cols]] += 1.0 / len(items) if self.bound is not None else 1.0
        if vector and self.vector is not None:
            self.vector[items] += 1.0 / math.sqrt(len(items))

    def symmetric(self, upper: np.ndarray) -> np.ndarray:
        """The full symmetric matrix from the accumulated upper triangle (in place)."""
        upper += np.triu(upper, 1).T
        return upper

    def close(self) -> None:
        self.bar.close()


def gram_strategy(book: GramBook):
    """A Flower strategy that sends round r's cohort to the device slots (slot j plays the cohort's
    j-th client) and adds every reply into the book; nothing is evaluated by clients."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class GramSum(FedAvg):
        def __repr__(self) -> str:
            return f"GramSum(clients={len(book.order)}, cohort={book.cohort}, rounds={book.rounds})"

        def configure_fit(self, server_round, parameters, client_manager):
            chosen = book.cohort_of(server_round)
            client_manager.wait_for(book.cohort)
            nodes = client_manager.all()
            proxies = [nodes[cid] for cid in sorted(nodes)][: len(chosen)]
            config = {"server_round": server_round, "train_too": book.train_too, "form": book.form}
            self.assigned = {proxy.cid: int(c) for proxy, c in zip(proxies, chosen)}  # the server knows whom it asked
            return [(proxy, FitIns(parameters, {**config, "client": int(c)})) for proxy, c in zip(proxies, chosen)]

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"federated gram round {server_round}: {len(failures)} client(s) failed (see the Flower log)")
            chosen = book.cohort_of(server_round)
            for proxy, res in results:
                book.add(self.assigned[proxy.cid], parameters_to_ndarrays(res.parameters), int(res.num_examples))
            if len(results) != len(chosen):
                raise RuntimeError(f"federated gram round {server_round}: {len(results)} replies for {len(chosen)} clients")
            return ndarrays_to_parameters([np.zeros(1, np.float32)]), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

    return GramSum(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=book.cohort, accept_failures=False,
                   initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))  # fmt: skip


def simulate_gram(cfg: TrainConfig, parts: list[ClientData], n_items: int, store: Path, train_too: bool) -> GramBook:
    """One pass of the clients through Flower's simulation (Ray backend); returns the server's sums."""
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    from training.federated.fit import run_flower

    fed = cfg.federated
    write_client_store(store, parts)
    cohort = sampled_clients(fed, len(parts))
    order = np.random.default_rng(cfg.trainer.seed).permutation(len(parts))
    book = GramBook(n_items, order, cohort, 1.0 if fed.dp else None, train_too, fed.progress, one_user=fed.partition == "user")
    strategy = gram_strategy(book)
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=book.rounds), strategy=strategy)
        DefaultWorkflow()(grid, legacy)

    try:
        run_flower(app, make_gram_client_app(str(store), n_items, fed.dp), cohort, fed)
    finally:
        book.close()
    if len(book.reported) != len(parts):
        raise RuntimeError(f"federated gram: {len(book.reported)} of {len(parts)} clients reported (a round failed; see the Flower log)")
    return book


def choose_lambda(g_train: np.ndarray, lambdas: list[float], train: CSR, val: CSR, k: int) -> tuple[float, dict[float, float]]:
    """The λ of `lambdas` whose EASE on the train Gram gives the best validation NDCG@k (history: train)."""
    users = np.flatnonzero(np.diff(val[0]) > 0)
    n_items = len(g_train)
    scores: dict[float, float] = {}
    for lam in lambdas:
        p, q, rank = ease_from_release(g_train.copy(), lam, None, noisy=False)
        model = GramEase(n_items, lam, rank, p.astype(np.float32), q.astype(np.float32), np.zeros(n_items))
        topk = model.topk(train, users, k)
        scores[lam] = evaluation.ranking_metrics(topk, val[:2], users, k, n_items)[f"ndcg@{k}"]
        log.info("federated gram: lambda %g -> val ndcg@%d %.4f", lam, k, scores[lam])
    best = max(lambdas, key=lambda lam: (scores[lam], -lam))
    return float(best), scores


def fit_federated_gram(cfg: TrainConfig, data, ctx, tracker) -> tuple[GramEase, FitResult]:
    """Every client sends its Gram part once (Flower), the server sums, adds DP noise when asked, and
    fits EASE; returns the model and a FitResult whose privacy block the manifest, MLflow and ledger read."""
    import tempfile

    from training.federated.fit import client_partitions

    check(cfg)
    started = time.perf_counter()
    fed, p = cfg.federated, cfg.privacy
    n_items = data.dataset.n_items
    parts = client_partitions(cfg, data, ctx)
    n = len(parts)
    if n == 0:
        raise ConfigError("federated.strategy: gram needs at least one training user")
    choose = not fed.dp and p.gram_lambda is None
    log.info("federated gram: %d clients (%s), %d per round", n, fed.partition, sampled_clients(fed, n))
    with tempfile.TemporaryDirectory(prefix="trustrec-flg-") as tmp:
        book = simulate_gram(cfg, parts, n_items, Path(tmp) / "clients", train_too=choose)
    sums_s = time.perf_counter() - started
    delta = fed.dp_delta if fed.dp_delta is not None else 1.0 / n
    sigma = 0.0
    if fed.dp:
        sigma = fed.noise_multiplier if fed.target_epsilon is None else gaussian_sigma(fed.target_epsilon, delta)
    # under DP, DP-EASE's rules (with one-user clients part of the budget may go to the popularity vector)
    rules = release_rules(p, sigma, n_items, n, vector=book.vector is not None, weighted=False) if fed.dp else None
    share = rules.share if rules else 0.0
    sigma_gram, sigma_vector = (rules.sigma_gram, rules.sigma_vector) if rules else (0.0, 0.0)
    val_scores: dict[float, float] = {}
    if rules:
        lam, rule = rules.lam, rules.lam_rule
    elif p.gram_lambda is not None:
        lam, rule = p.gram_lambda, "privacy.gram_lambda"
    else:
        lam, val_scores = choose_lambda(book.symmetric(book.train), list(fed.gram_lambdas), data.train, data.val, cfg.task.eval_k)
        rule = "validation over federated.gram_lambdas (server-side evaluation)"
    book.train = None
    mu = rules.mu if rules else 0.0
    statistic = "the item Gram matrix summed over Flower clients" + (" (DP-released by the server)" if fed.dp else "")
    model = release_statistic(book.symmetric(book.seen), sigma_gram, lam, p.gram_rank, np.random.default_rng(cfg.trainer.seed), mu,
                              kind=KIND, statistic=statistic, diagonal_fallback=not fed.dp,
                              vector=book.vector if share > 0 else None, vector_sigma=sigma_vector if share > 0 else 0.0)  # fmt: skip
    seconds = time.perf_counter() - started
    log.info("federated gram: %d clients in %d rounds (%.0fs), lambda %g, rank %d, sigma %.4g (%.0fs in all)", n, book.rounds, sums_s, lam, model.rank, sigma, seconds)
    privacy: dict[str, Any] = {
        "mode": "federated",
        "framework": "flower",
        "strategy": "gram",
        "partition": fed.partition,
        "clients": n,
        "clients_per_round": book.cohort,
        "rounds": book.rounds,
        "secure_aggregation": False,
        "client_dp": fed.dp,
        "message": ("the user's item set (train + validation), from which the server adds the user's Gram part" if book.form == "items"
                    else "the upper triangle of the client's users' Gram part (row, col, value), train + validation items"),
        "lambda": float(lam),
        "lambda_rule": rule,
        "rank": int(model.rank),
        "clipped_clients": book.clipped,
    }
    if fed.dp:
        privacy.update({
            "privacy_unit": "user" if fed.partition == "user" else "user (clients hold several)",
            "mechanism": MECHANISM, "accountant": ACCOUNTANT, "epsilon": float(gaussian_epsilon(sigma, delta)), "delta": float(delta),
            "target_epsilon": fed.target_epsilon, "sigma": float(sigma), "noise_multiplier": float(sigma), "sensitivity": 1.0,
            "clipping": CLIPPING + ("; the server builds each user's unit part from the item set" if book.form == "items"
                                    else "; the server scales down any client part above its users' bound"),
            "releases": 1, "training_users": n,
            **rules.block(), "fallback": model.fallback, "noise_seed": cfg.trainer.seed,
        })  # fmt: skip
    if tracker.enabled:
        metrics = {"federated/rounds": float(book.rounds), "federated/clients": float(n), "federated/clipped_clients": float(book.clipped),
                   "federated/sums_seconds": sums_s, "ease/lambda": lam, "ease/rank": float(model.rank)}  # fmt: skip
        metrics |= {f"ease/val_ndcg_lambda_{lam_:g}": v for lam_, v in val_scores.items()}
        if fed.dp:
            metrics |= {"privacy/epsilon": privacy["epsilon"], "privacy/delta": delta, "privacy/sigma": sigma, "privacy/sigma_gram": sigma_gram,
                        "privacy/popularity_share": share, "ease/prior_weight": mu}  # fmt: skip
        tracker.log_metrics(metrics)
        tracker.set_tags({"model": KIND, "privacy.mode": "federated", "federated.strategy": "gram"})
    best = max(val_scores.values()) if val_scores else float("nan")
    return model, FitResult(book.rounds, best, book.rounds, [], seconds, privacy)  # released after the last round
