"""The Flower ServerApp: strategy (FedAvg / FedAdam / FedProx), the client-level DP wrapper, the
SecAgg+ workflow, and per-round bookkeeping (aggregated metrics, best weights, patience).

The legacy-compatible workflow (`LegacyContext` + `DefaultWorkflow`) is used because Flower's
SecAgg+ (`SecAggPlusWorkflow`) runs on it; the same path serves every option, so a run with and
without secure aggregation differs only in the fit workflow.
"""
from __future__ import annotations

import logging
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
    _bad: int = 0
    _bar: Any = None

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
        if self._bar is None:
            self._bar = tqdm(total=self.rounds, desc="federated rounds", disable=not self.progress)
        return None

    def on_evaluate(self, results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
        metrics = weighted_mean(results)
        r = self._round
        row = {"round": float(r), **self._fit.get(r, {}), "federated/clients_evaluate": float(len(results))}
        row.update({f"val/{k}": v for k, v in metrics.items()})
        self.history.append(row)
        if row.get(self.monitor, -1.0) > self.best:
            self.best, self.best_round, self._bad = row[self.monitor], r, 0
            self.best_weights = [np.array(w, copy=True) for w in self.weights]
        else:
            self._bad += 1
        if self._bad >= self.patience:
            self.stopped = True
            log.info("federated early stop at round %d: no %s gain for %d rounds", r, self.monitor, self._bad)
        self._bar.update(1)
        self._bar.set_postfix({self.monitor: f"{row.get(self.monitor, float('nan')):.4f}", "loss": f"{row.get('train/loss', float('nan')):.4f}"})
        return metrics

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def sampled_clients(fed: FederatedConfig, n_clients: int, evaluate: bool = False) -> int:
    """Clients per training (or evaluation) round, as Flower's FedAvg samples them once all
    `n_clients` are registered."""
    fraction = fed.fraction_evaluate if evaluate else fed.fraction_fit
    return min(n_clients, max(int(n_clients * fraction), min(fed.min_clients, n_clients)))


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon of `rounds` Gaussian releases with noise sigma*C on a sum with sensitivity C
    (one client added or removed), by Opacus' RDP accountant. No amplification by sampling is
    claimed (Flower samples a fixed number of clients, not Poisson), as in Flower's own accountant
    for fixed clipping: the figure is an upper bound."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if rounds == 0:
        return 0.0
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def build_strategy(fed: FederatedConfig, n_clients: int, initial: list[np.ndarray], book: RoundBook):
    """The Flower strategy, wrapped for client-level DP when `federated.dp` is on (`fit.check`
    has refused DP with FedAdam)."""
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
    if fed.strategy == "fedadam":
        strategy = FedAdam(**common, eta=fed.server_lr, tau=1e-3)
    elif fed.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=fed.proximal_mu)
    else:
        strategy = FedAvg(**common)
    if fed.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, fed.noise_multiplier, fed.clipping_norm, sampled_clients(fed, n_clients))
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
