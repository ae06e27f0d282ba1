"""`fit_federated`: the pipeline's fit step when `privacy.mode` is federated.

Partitions the training users into clients, gives each client its own storage (a file holding its
users' data only), runs a Flower simulation on the Ray backend, and loads the global weights of
the best round (by federated validation NDCG) into `model`, so that testing, export and MLflow
after the fit work unchanged. Round metrics go to MLflow with step = round.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ConfigError, TrainConfig
from training.data import Context
from training.federated.client import ClientPlan, get_weights, make_client_app, set_weights
from training.federated.partition import ClientData, partition_users, write_client_store
from training.federated.server import RoundBook, build_strategy, client_level_epsilon, device_slots, make_server_app, noise_multiplier, sample_rate, sampled_clients
from training.model import TwoTower
from training.task import RetrievalTask
from training.tracking import Tracker
from training.trainer import FitResult

log = logging.getLogger(__name__)


def check(cfg: TrainConfig) -> None:
    fed = cfg.federated
    if cfg.model.use_user_id:
        raise ConfigError("model.use_user_id: must be false with privacy.mode=federated (a per-user embedding row would leave its client)")
    if fed.dp and fed.strategy == "fedadam" and fed.sampling != "poisson":
        raise ConfigError("federated.dp: needs strategy fedavg or fedprox (the noise is calibrated to an average of clipped updates), "
                          "or sampling poisson (noise added before the server's Adam step)")  # fmt: skip
    if fed.secagg and fed.secagg_reconstruction_threshold > fed.secagg_num_shares:
        raise ConfigError("federated.secagg_reconstruction_threshold: must not exceed federated.secagg_num_shares")
    if fed.sampling == "poisson" and fed.evaluation != "server":
        raise ConfigError("federated.evaluation: must be server with federated.sampling=poisson (device slots play sampled trainers only)")
    if fed.sampling == "poisson" and fed.secagg:
        raise ConfigError("federated.secagg: not with federated.sampling=poisson (SecAgg+ needs the same nodes to share keys every round)")
    if fed.target_epsilon is not None and not fed.dp:
        raise ConfigError("federated.target_epsilon: needs federated.dp=true")


def client_partitions(cfg: TrainConfig, data, ctx: Context) -> list[ClientData]:
    fed = cfg.federated
    users = np.flatnonzero(np.diff(data.train[0]) > 0)
    parts = partition_users(users, fed.partition, fed.n_silos, fed.partition_seed)
    return [ClientData.build(p, data.train, data.val, ctx.users) for p in parts]


def privacy_block(cfg: TrainConfig, n_clients: int, rounds_run: int) -> dict[str, Any]:
    """What the run guarantees, for the manifest and MLflow."""
    fed = cfg.federated
    block: dict[str, Any] = {
        "mode": "federated",
        "framework": "flower",
        "strategy": fed.strategy,
        "partition": fed.partition,
        "clients": n_clients,
        "clients_per_round": sampled_clients(fed, n_clients),
        "rounds": rounds_run,
        "local_epochs": fed.local_epochs,
        "secure_aggregation": fed.secagg,
        "client_dp": fed.dp,
    }
    if fed.sampling == "poisson":
        block["sampling"] = f"poisson, q = {fed.fraction_fit}"
    if fed.dp:
        delta = fed.dp_delta if fed.dp_delta is not None else 1.0 / n_clients
        q, sigma = sample_rate(fed, n_clients), noise_multiplier(fed, n_clients)
        block.update({
            "privacy_unit": "user" if fed.partition == "user" else "client (silo)",
            "epsilon": client_level_epsilon(sigma, rounds_run, delta, q),
            "delta": delta,
            "noise_multiplier": sigma,
            "clipping_norm": fed.clipping_norm,
            "release": "the last round's weights (validation picks no round and stops nothing)",
            "accountant": "rdp (opacus), no sampling amplification" if q == 1.0 else f"rdp (opacus), poisson-subsampled gaussian, sample_rate {q}, steps = rounds",
        })  # fmt: skip
        if q < 1.0:
            block["sample_rate"] = q
    return block


def server_evaluator(cfg: TrainConfig, model: TwoTower, data, ctx: Context):
    """evaluation: server: weights -> the trainer's validation metrics over every user with
    validation items (history = train), scored on a private copy of the model."""
    task = RetrievalTask(cfg.task, np.ones(model.spec.n_items))
    scorer = TwoTower(model.spec, device=torch.device("cpu"))
    names = tuple(scorer.state_dict().keys())

    def evaluate(weights: list[np.ndarray]) -> dict[str, float]:
        set_weights(scorer, names, weights)
        scorer.eval()
        with torch.no_grad():
            metrics = task.metrics(scorer, data.train, data.val, ctx, torch.device("cpu"))
        return {k: float(v) for k, v in metrics.items()}

    return evaluate


def run_flower(server_app, client_app, nodes: int, fed) -> None:
    """Flower's simulation of `nodes` supernodes on a local Ray (one actor per `num_cpus_per_client`
    cores, `ray_num_cpus` in all), Flower's per-round INFO logs muted, Ray shut down after."""
    from flwr.simulation import run_simulation

    init_args: dict[str, Any] = {"address": "local", "include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if fed.ray_num_cpus:
        init_args["num_cpus"] = fed.ray_num_cpus
    backend = {"client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower logs every round at INFO; the tqdm bar says enough
    try:
        run_simulation(server_app, client_app, num_supernodes=nodes, backend_config=backend)
    finally:
        flwr_log.setLevel(level)
        import ray

        if ray.is_initialized():
            ray.shutdown()


def simulate(cfg: TrainConfig, model: TwoTower, parts: list[ClientData], ctx: Context, store: Path, data=None) -> RoundBook:
    """Run the Flower simulation; returns the server's round book (history, best weights).
    `data` (train / val CSRs): needed by evaluation: server."""
    fed, m, t = cfg.federated, cfg.model, cfg.trainer
    names = tuple(model.state_dict().keys())
    write_client_store(store, parts)
    plan = ClientPlan(
        spec=model.spec, items=ctx.items, rating_weighted=ctx.rating_weighted, task=cfg.task, param_names=names, store=str(store),
        lr=fed.client_lr or t.lr, weight_decay=t.weight_decay, local_epochs=fed.local_epochs, local_batch_size=fed.local_batch_size,
        history_dropout=cfg.task.history_dropout, user_id_dropout=m.user_id_dropout, demographics_dropout=m.demographics_dropout,
        stated_dropout=m.stated_dropout, item_id_dropout=m.item_id_dropout, seed=t.seed, uniform_weights=fed.dp,
        dp=fed.dp, secagg=fed.secagg, audit_dir=fed.audit_dir, optimizer=fed.client_optimizer,
    )  # fmt: skip
    book = RoundBook(fed.rounds, fed.patience, f"val/ndcg@{cfg.task.eval_k}", fed.progress, select_on_validation=not fed.dp)
    book.max_seconds = None if fed.max_minutes is None else 60.0 * fed.max_minutes
    if fed.evaluation == "server":
        if data is None:
            raise ValueError("federated.evaluation=server: simulate needs the data (train / val) to score the global model")
        book.server_eval, book.eval_every = server_evaluator(cfg, model, data, ctx), fed.eval_every
        book.eval_users = int((np.diff(data.val[0]) > 0).sum())
    strategy = build_strategy(fed, len(parts), get_weights(model), book, seed=t.seed)
    nodes = device_slots(len(parts), fed.fraction_fit) if fed.sampling == "poisson" else len(parts)
    max_weight = 1.0 if fed.dp else float(max(len(p.users) for p in parts))
    try:
        run_flower(make_server_app(fed, strategy, book, max_weight), make_client_app(plan), nodes, fed)
    finally:
        book.close()
    if len(book.history) < book.rounds_run:
        raise RuntimeError(f"federated: {book.rounds_run} rounds ran but only {len(book.history)} were evaluated (a client failed; see the Flower log)")
    return book


def fit_federated(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data, ctx: Context, device: torch.device, tracker: Tracker) -> FitResult:
    check(cfg)
    started = time.perf_counter()
    parts = client_partitions(cfg, data, ctx)
    log.info("federated: %d clients (%s), up to %d rounds, strategy %s", len(parts), cfg.federated.partition, cfg.federated.rounds, cfg.federated.strategy)
    with tempfile.TemporaryDirectory(prefix="trustrec-fl-") as tmp:
        book = simulate(cfg, model, parts, ctx, Path(tmp) / "clients", data)
    weights, released = book.released()
    if weights is None or book.best_weights is None:
        raise RuntimeError("federated: no round was evaluated")
    set_weights(model, tuple(model.state_dict().keys()), weights)
    model.to(device)
    history = [{"epoch": int(row["round"]), **row} for row in book.history]
    for row in history:
        tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "round")}, step=row["epoch"])
    privacy = privacy_block(cfg, len(parts), book.rounds_run)
    if "epsilon" in privacy:
        tracker.log_metrics({"privacy/epsilon": privacy["epsilon"], "privacy/delta": privacy["delta"]})
    monitor = [row[book.monitor] for row in book.history if row.get("round") == released and book.monitor in row]
    return FitResult(released, monitor[0] if monitor else float("nan"), book.rounds_run, history, time.perf_counter() - started, privacy)
