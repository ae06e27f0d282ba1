"""The Flower ServerApp: strategy (FedAvg / FedAdam / FedProx), the client-level DP wrapper, the
SecAgg+ workflow, and per-round bookkeeping (aggregated metrics, best weights, patience).

The legacy-compatible workflow (`LegacyContext` + `DefaultWorkflow`) is used because Flower's
SecAgg+ (`SecAggPlusWorkflow`) runs on it; the same path serves every option, so a run with and
without secure aggregation differs only in the fit workflow.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from training.config import FederatedConfig

log = logging.getLogger(__name__)


def weighted_mean(results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Mean of each scalar metric weighted by the client's example count (per-user means
    weighted by users give exactly the mean over all users)."""
    total = sum(n for n, _ in results)
    if total == 0:
        return {}
    keys = set().union(*(m for _, m in results))
    return {k: sum(n * float(m[k]) for n, m in results if k in m) / sum(n for n, m in results if k in m) for k in sorted(keys)}


@dataclass
class RoundBook:
    """Server-side record of the run; Flower calls its hooks from the ServerApp thread.

    Per round r: `on_fit` (aggregated train metrics) -> `on_params(r, weights)` (the new global
    weights) -> `on_evaluate` (aggregated federated validation metrics; closes round r)."""

    rounds: int
    patience: int
    monitor: str  # e.g. val/ndcg@10
    progress: bool = True
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -1.0
    best_round: int = 0
    best_weights: list[np.ndarray] | None = None
    stopped: bool = False
    rounds_run: int = 0
    _round: int = 0
    _fit: dict[int, dict[str, float]] = field(default_factory=dict)
    weights: list[np.ndarray] | None = None  # the latest global weights
    # evaluation: server: weights -> val metrics (no val/ prefix), called every eval_every rounds and
    # at the last one from `on_params`, which then closes the round itself (no client evaluates)
    server_eval: Callable[[list[np.ndarray]], dict[str, float]] | None = None
    eval_every: int = 1
    eval_users: int = 0  # users the server-side evaluation scores (for the clients_evaluate column)
    max_seconds: float | None = None  # stop after the first evaluated round past this wall-clock budget
    # False (client-level DP): validation neither stops the run (patience) nor picks the released round,
    # which is the last one; validation is still recorded. Choosing a round on the users' validation
    # data would read them outside the accountant, as early stopping would for DP-SGD (it releases its last model)
    select_on_validation: bool = True
    _bad: int = 0
    _bar: Any = None
    _started: float | None = None

    def on_fit(self, results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
        metrics = weighted_mean(results)
        self._fit[self._round + 1] = {"train/loss": metrics.get("train_loss", float("nan")), "federated/clients_fit": float(len(results))}
        return metrics

    def on_params(self, server_round: int, weights: list[np.ndarray], config: dict) -> None:
        """Flower's centralized-evaluation hook, used only to see the new global weights."""
        if self.stopped:
            return None
        if server_round >= 1 and server_round not in self._fit:
            raise RuntimeError(f"federated round {server_round}: no aggregate (a client failed; see the Flower log above)")
        self._round, self.weights = server_round, weights
        if server_round >= 1:
            self.rounds_run = server_round
        if self._started is None:
            self._started = time.perf_counter()
        if self._bar is None:
            self._bar = tqdm(total=self.rounds, desc="federated rounds", disable=not self.progress)
        if self.server_eval is not None and server_round >= 1:
            if server_round % self.eval_every == 0 or server_round == self.rounds:
                self._close(self.server_eval(weights), self.eval_users)
            else:
                self._close(None, 0)
        return None

    def on_evaluate(self, results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
        metrics = weighted_mean(results)
        self._close(metrics, len(results))
        return metrics

    def _close(self, metrics: dict[str, float] | None, evaluated: int) -> None:
        """Record round `_round`; `metrics` None: a round without evaluation (no val columns, no
        patience step)."""
        r = self._round
        row = {"round": float(r), **self._fit.get(r, {}), "federated/clients_evaluate": float(evaluated)}
        if self._started is not None:
            row["federated/elapsed_s"] = time.perf_counter() - self._started  # since the server sent round 0's weights
        self.history.append(row)
        if metrics is None:
            self._bar.update(1)
            return
        row.update({f"val/{k}": v for k, v in metrics.items()})
        if row.get(self.monitor, -1.0) > self.best:
            self.best, self.best_round, self._bad = row[self.monitor], r, 0
            self.best_weights = [np.array(w, copy=True) for w in self.weights]
        else:
            self._bad += 1
        if self.select_on_validation and self._bad >= self.patience:
            self.stopped = True
            log.info("federated early stop at round %d: no %s gain for %d rounds", r, self.monitor, self._bad)
        if self.max_seconds is not None and row.get("federated/elapsed_s", 0.0) > self.max_seconds:
            self.stopped = True
            log.info("federated stop at round %d: the %.0f s budget is spent", r, self.max_seconds)
        self._bar.update(1)
        self._bar.set_postfix({self.monitor: f"{row.get(self.monitor, float('nan')):.4f}", "loss": f"{row.get('train/loss', float('nan')):.4f}"})

    def released(self) -> tuple[list[np.ndarray] | None, int]:
        """(weights, round) the run publishes: the best validation round's, or with
        `select_on_validation` False the last round's."""
        return (self.best_weights, self.best_round) if self.select_on_validation else (self.weights, self.rounds_run)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def sampled_clients(fed: FederatedConfig, n_clients: int, evaluate: bool = False) -> int:
    """Clients per training (or evaluation) round, as Flower's FedAvg samples them once all
    `n_clients` are registered; under poisson sampling the expected number, rounded."""
    fraction = fed.fraction_evaluate if evaluate else fed.fraction_fit
    if fed.sampling == "poisson":
        return int(round(n_clients * fraction))
    return min(n_clients, max(int(n_clients * fraction), min(fed.min_clients, n_clients)))


def sample_rate(fed: FederatedConfig, n_clients: int) -> float:
    """The probability that a given client trains in a given round: q of the subsampled Gaussian
    (poisson), or 1 where no amplification is claimed (Flower's fixed-size sampling)."""
    return fed.fraction_fit if fed.sampling == "poisson" else 1.0


def device_slots(n_clients: int, rate: float, tail: float = 1e-9) -> int:
    """Flower nodes that play the sampled clients under poisson sampling: the smallest K with
    P(Binomial(n_clients, rate) > K) < tail (a round that samples more fails loudly)."""
    from scipy.stats import binom

    return max(1, min(n_clients, int(binom.isf(tail, n_clients, rate)) + 1))


ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """epsilon of `rounds` Gaussian releases with noise sigma*C on a sum with sensitivity C
    (one client added or removed), by Opacus' RDP accountant. sample_rate 1: no amplification by
    sampling is claimed (Flower's fixed-size sampling), as in Flower's own accountant for fixed
    clipping: the figure is an upper bound. sample_rate q < 1: the Poisson-subsampled Gaussian
    mechanism (each client in a round with probability q, `federated.sampling: poisson`)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if rounds == 0:
        return 0.0
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose `client_level_epsilon` is at most
    `target_epsilon` (bisection; epsilon falls as the noise grows)."""
    lo, hi = 1e-2, 1.0
    while client_level_epsilon(hi, rounds, delta, sample_rate) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"federated.target_epsilon: {target_epsilon} is out of reach in {rounds} rounds at delta {delta}")
    while (hi - lo) / hi > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if client_level_epsilon(mid, rounds, delta, sample_rate) <= target_epsilon else (mid, hi)
    return hi


def noise_multiplier(fed: FederatedConfig, n_clients: int) -> float:
    """sigma of the run: derived from federated.target_epsilon (for `rounds` rounds) when set."""
    if fed.target_epsilon is None:
        return fed.noise_multiplier
    delta = fed.dp_delta if fed.dp_delta is not None else 1.0 / n_clients
    return noise_for_epsilon(fed.target_epsilon, fed.rounds, delta, sample_rate(fed, n_clients))


def poisson_strategy(base: type):
    """`base` (FedAvg, FedAdam, FedProx) with poisson client sampling onto device slots.

    configure_fit draws each of the `n_clients` clients with probability `rate` (seeded) and sends
    slot j the round's j-th sampled client id (`client` in the fit config): the slot loads that
    client's own storage and trains as it. No client evaluates (evaluation: server).

    Client-level DP (`noise_multiplier` set): clients clip their update to C (Flower's
    fixedclipping_mod, the norm sent in the fit config as Flower's DP wrapper does), and the
    average the server optimizer sees is the fixed-denominator DP-FedAvg estimator
    sum_i clip(w_i - w) / (q N) plus Gaussian noise of std sigma * C / (q N) (Flower's
    compute_stdv / add_gaussian_noise_inplace): one client changes the sum by at most C, so this
    is the subsampled Gaussian mechanism the accountant composes. FedAdam's server step runs on
    the noised average (post-processing), which Flower's wrapper, noising the strategy's output,
    cannot do."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace, compute_stdv

    class NoisedAverage(FedAvg):
        """FedAvg's aggregate, replaced under DP by the noised fixed-denominator estimator."""

        def aggregate_fit(self, server_round, results, failures):
            if self.noise_multiplier is None or not results:
                return super().aggregate_fit(server_round, results, failures)
            if failures:
                return None, {}
            denominator = self.rate * self.n_clients
            total = [np.zeros(g.shape, np.float64) for g in self._global]
            for _, res in results:
                for t, w, g in zip(total, parameters_to_ndarrays(res.parameters), self._global):
                    t += w.astype(np.float64) - g
            average = [(t / denominator).astype(g.dtype) for g, t in zip(self._global, total)]
            add_gaussian_noise_inplace(average, compute_stdv(self.noise_multiplier, self.clipping_norm, denominator))
            metrics = self.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results]) if self.fit_metrics_aggregation_fn else {}
            return ndarrays_to_parameters([g + a for g, a in zip(self._global, average)]), metrics

    class Poisson(*((NoisedAverage,) if base is FedAvg else (base, NoisedAverage))):
        def __init__(self, *, n_clients: int, rate: float, slots: int, seed: int, noise_multiplier: float | None, clipping_norm: float, **kw):
            super().__init__(**kw)
            self.n_clients, self.rate, self.slots = n_clients, rate, slots
            self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
            self.rng = np.random.default_rng(seed)
            self._global: list[np.ndarray] | None = None

        def __repr__(self) -> str:
            return f"Poisson{base.__name__}(q={self.rate}, clients={self.n_clients}, slots={self.slots}, sigma={self.noise_multiplier})"

        def configure_fit(self, server_round, parameters, client_manager):
            self._global = parameters_to_ndarrays(parameters)
            chosen = np.flatnonzero(self.rng.random(self.n_clients) < self.rate)
            if len(chosen) > self.slots:
                raise RuntimeError(f"federated round {server_round}: {len(chosen)} clients sampled but only {self.slots} device slots")
            client_manager.wait_for(self.slots)
            nodes = client_manager.all()
            proxies = [nodes[cid] for cid in sorted(nodes)][: len(chosen)]
            config = dict(self.on_fit_config_fn(server_round)) if self.on_fit_config_fn else {}
            if hasattr(self, "proximal_mu"):
                config["proximal_mu"] = self.proximal_mu
            if self.noise_multiplier is not None:
                config[KEY_CLIPPING_NORM] = self.clipping_norm
            return [(proxy, FitIns(parameters, {**config, "client": int(c)})) for proxy, c in zip(proxies, chosen)]

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

    Poisson.__name__ = f"Poisson{base.__name__}"
    return Poisson


def build_strategy(fed: FederatedConfig, n_clients: int, initial: list[np.ndarray], book: RoundBook, seed: int = 0):
    """The Flower strategy, wrapped for client-level DP when `federated.dp` is on (`fit.check`
    has refused DP with FedAdam). `seed`: poisson sampling's draws."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedProx

    common: dict[str, Any] = dict(
        fraction_fit=fed.fraction_fit,
        fraction_evaluate=fed.fraction_evaluate,
        # Flower sizes a round from the clients registered at that instant and only then waits for
        # min_available_clients: with min_fit_clients=min_clients, a round that starts while one
        # simulated client is still registering trains 2 of 3 silos. The floors are therefore the
        # sizes at full registration, so every round samples as many clients as `sampled_clients` says.
        min_fit_clients=sampled_clients(fed, n_clients),
        min_evaluate_clients=sampled_clients(fed, n_clients, evaluate=True),
        min_available_clients=n_clients,  # every simulated client is registered before round 1
        evaluate_fn=book.on_params,
        on_fit_config_fn=lambda r: {"server_round": r},
        on_evaluate_config_fn=lambda r: {"server_round": r},
        accept_failures=False,  # a failed client stops the run loudly instead of shrinking the average
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=book.on_fit,
        evaluate_metrics_aggregation_fn=book.on_evaluate,
    )
    base, extra = {"fedadam": (FedAdam, {"eta": fed.server_lr, "tau": 1e-3}), "fedprox": (FedProx, {"proximal_mu": fed.proximal_mu}), "fedavg": (FedAvg, {})}[fed.strategy]
    if fed.sampling == "poisson":
        slots = device_slots(n_clients, fed.fraction_fit)
        common.update(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=slots)
        sigma = noise_multiplier(fed, n_clients) if fed.dp else None
        return poisson_strategy(base)(**common, **extra, n_clients=n_clients, rate=fed.fraction_fit, slots=slots, seed=seed, noise_multiplier=sigma, clipping_norm=fed.clipping_norm)
    strategy = base(**common, **extra)
    if fed.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier(fed, n_clients), fed.clipping_norm, sampled_clients(fed, n_clients))
    return strategy


class _UntilStopped:
    """A workflow step that does nothing once the book says the run stopped (patience)."""

    def __init__(self, step: Callable, book: RoundBook):
        self.step, self.book = step, book

    def __call__(self, grid, context) -> None:
        if not self.book.stopped:
            self.step(grid, context)


def make_server_app(fed: FederatedConfig, strategy, book: RoundBook, max_weight: float):
    """ServerApp running `fed.rounds` rounds of the legacy DefaultWorkflow (SecAgg+ when asked)."""
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow

    if fed.secagg:
        fit = SecAggPlusWorkflow(
            num_shares=fed.secagg_num_shares,
            reconstruction_threshold=fed.secagg_reconstruction_threshold,
            max_weight=max_weight,  # the largest client weight (users per client, or 1 under DP)
            clipping_range=fed.secagg_clipping_range,
        )
    else:
        fit = default_fit_workflow
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=_UntilStopped(fit, book), evaluate_workflow=_UntilStopped(default_evaluate_workflow, book))(grid, legacy)

    return app
