"""Federated learning (Flower): partitioning and bookkeeping by hand, then real Flower simulations
on the Ray backend (2 CPUs): weights change and equal the FedAvg of what the clients sent, the
clients send only weight arrays and scalar metrics, and the pipeline run carries the privacy block
(with a client-level DP epsilon) into the manifest and per-round metrics into MLflow."""
from __future__ import annotations

import glob
import json
import math
import pickle
import threading

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters

from training.config import ConfigError, load_config
from training.federated.client import proximal_term
from training.federated.fit import check, client_partitions, privacy_block, simulate
from training.federated.partition import ClientData, keep_rows, keep_user_side, partition_users
from training.federated.server import RoundBook, build_strategy, client_level_epsilon, sampled_clients, weighted_mean
from training.pipeline import build_model, context, prepare
from training.trainer import seed_everything

from tests.conftest import REPO, tiny_overrides

CPU = torch.device("cpu")


def tiny(root, *extra: str):
    """60 synthetic users in 3 silos, a small model, 2 rounds, Ray on 2 CPUs."""
    return load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + [
        "privacy.mode=federated", "data.synthetic.n_users=60", "data.synthetic.n_items=80",
        "data.synthetic.mean_interactions_per_user=10", "model.embedding_dim=16", "model.hidden_dim=16",
        "model.output_dim=16", "tracking.register_model=false", "federated.n_silos=3", "federated.rounds=2",
        "federated.ray_num_cpus=2", "federated.num_cpus_per_client=1", "federated.progress=false", *extra,
    ])  # fmt: skip


# -- partitioning (by hand) -----------------------------------------------------------------------
def test_silos_are_near_equal_disjoint_and_cover_every_user():
    parts = partition_users(np.arange(10), "silos", n_silos=3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]  # 10 = 4 + 3 + 3, the first ones larger
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted, no repeats
    again = partition_users(np.arange(10), "silos", n_silos=3, seed=0)
    assert all((a == b).all() for a, b in zip(parts, again))  # same seed, same silos
    other = partition_users(np.arange(10), "silos", n_silos=3, seed=1)
    assert any(set(a) != set(b) for a, b in zip(parts, other))


def test_cross_device_is_one_user_per_client():
    parts = partition_users(np.array([5, 7, 9]), "user")
    assert [p.tolist() for p in parts] == [[5], [7], [9]]


def test_more_silos_than_users_names_the_key():
    with pytest.raises(ConfigError, match="federated.n_silos: 4 silos but only 3 users"):
        partition_users(np.arange(3), "silos", n_silos=4)


def test_keep_rows_blanks_every_other_user():
    # user 0: items 1, 4 (ratings 5, 4); user 1: item 2 (3); user 2: items 0, 3 (2, 1)
    csr = (np.array([0, 2, 3, 5]), np.array([1, 4, 2, 0, 3]), np.array([5.0, 4.0, 3.0, 2.0, 1.0], np.float32))
    indptr, items, ratings = keep_rows(csr, np.array([0, 2]))
    assert indptr.tolist() == [0, 2, 2, 4]
    assert items.tolist() == [1, 4, 0, 3]
    assert ratings.tolist() == [5.0, 4.0, 2.0, 1.0]


def test_client_data_holds_only_its_own_users(tmp_path):
    cfg = tiny(tmp_path)
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    parts = client_partitions(cfg, data, ctx)
    assert len(parts) == 3
    for part in parts:
        train_rows = np.flatnonzero(np.diff(part.train[0]) > 0)
        val_rows = np.flatnonzero(np.diff(part.val[0]) > 0)
        assert set(train_rows) == set(part.users.tolist())
        assert set(val_rows) <= set(part.users.tolist())
        others = np.setdiff1d(np.arange(data.dataset.n_users), part.users)
        side = part.user_side
        assert not side.age[others].any() and not side.gender[others].any() and not side.occupation[others].any()
        assert (np.diff(side.liked[0])[others] == 0).all()
        # the client's own rows are exactly the global ones
        u = part.users[0]
        assert part.train[1][part.train[0][u] : part.train[0][u + 1]].tolist() == data.train[1][data.train[0][u] : data.train[0][u + 1]].tolist()
    assert sum(len(p.users) for p in parts) == int((np.diff(data.train[0]) > 0).sum())


def test_keep_user_side_keeps_the_users_own_features(tmp_path):
    cfg = tiny(tmp_path)
    ds = prepare(cfg).dataset
    side = context(cfg, ds).users
    mine = keep_user_side(side, np.array([1, 3]))
    assert mine.age[[1, 3]].tolist() == side.age[[1, 3]].tolist()
    assert mine.age[[0, 2]].tolist() == [0, 0]


# -- server bookkeeping and privacy accounting (by hand) -----------------------------------------
def test_weighted_mean_is_the_mean_over_users():
    # client A: 2 users with NDCG 1.0; client B: 6 users with NDCG 3.0 -> (2*1 + 6*3) / 8 = 2.5
    assert weighted_mean([(2, {"ndcg@10": 1.0}), (6, {"ndcg@10": 3.0})]) == {"ndcg@10": 2.5}
    assert weighted_mean([(0, {"ndcg@10": 1.0})]) == {}


def test_round_book_keeps_the_best_round_and_stops_on_patience():
    book = RoundBook(rounds=5, patience=2, monitor="val/ndcg@10", progress=False)
    for r, ndcg in enumerate([0.1, 0.3, 0.2, 0.25], start=1):
        book.on_fit([(1, {"train_loss": 1.0 / r})])
        book.on_params(r, [np.full(2, float(r))], {})
        book.on_evaluate([(1, {"ndcg@10": ndcg})])
    assert book.best_round == 2 and book.best == 0.3
    assert book.best_weights[0].tolist() == [2.0, 2.0]
    assert book.stopped  # rounds 3 and 4 did not beat round 2
    assert [row["train/loss"] for row in book.history] == [1.0, 0.5, 1 / 3, 0.25]


def test_with_client_dp_the_last_round_is_released_and_patience_stops_nothing():
    """Choosing the best validation round, or stopping on it, would read the users' validation data
    outside the accountant: under client-level DP the book releases the last round (DP-SGD's rule)."""
    book = RoundBook(rounds=5, patience=2, monitor="val/ndcg@10", progress=False, select_on_validation=False)
    for r, ndcg in enumerate([0.1, 0.3, 0.2, 0.25, 0.22], start=1):
        book.on_fit([(1, {"train_loss": 1.0 / r})])
        book.on_params(r, [np.full(2, float(r))], {})
        book.on_evaluate([(1, {"ndcg@10": ndcg})])
    assert not book.stopped and book.rounds_run == 5  # three rounds without a gain: patience 2 would have stopped at round 4
    weights, released = book.released()
    assert released == 5 and weights[0].tolist() == [5.0, 5.0]
    assert book.best_round == 2  # still recorded, not released
    plain = RoundBook(rounds=5, patience=9, monitor="val/ndcg@10", progress=False)
    for r, ndcg in enumerate([0.1, 0.3, 0.2], start=1):
        plain.on_fit([(1, {"train_loss": 1.0})])
        plain.on_params(r, [np.full(2, float(r))], {})
        plain.on_evaluate([(1, {"ndcg@10": ndcg})])
    weights, released = plain.released()
    assert released == 2 and weights[0].tolist() == [2.0, 2.0]  # without DP: the best validation round


def test_round_without_an_aggregate_fails_loudly():
    book = RoundBook(rounds=2, patience=5, monitor="val/ndcg@10", progress=False)
    with pytest.raises(RuntimeError, match="round 1: no aggregate"):
        book.on_params(1, [np.zeros(1)], {})


def test_epsilon_is_the_gaussian_mechanism_composed_per_round():
    sigma, rounds, delta = 2.0, 10, 1e-3
    # no amplification: RDP of order a is rounds * a / (2 sigma^2); Opacus' RDP -> (eps, delta)
    # conversion is eps(a) = rdp + log((a-1)/a) - (log delta + log a)/(a-1), minimized over a
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)), dtype=float)
    rdp = rounds * orders / (2 * sigma**2)
    expected = np.min(rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1))
    assert client_level_epsilon(sigma, rounds, delta) == pytest.approx(expected, rel=1e-9)
    assert client_level_epsilon(4.0, rounds, delta) < client_level_epsilon(sigma, rounds, delta)  # more noise
    assert client_level_epsilon(sigma, 20, delta) > client_level_epsilon(sigma, rounds, delta)  # more rounds


def test_privacy_block_reports_epsilon_only_with_dp(tmp_path):
    plain = privacy_block(tiny(tmp_path), n_clients=3, rounds_run=2)
    assert plain["mode"] == "federated" and plain["clients"] == 3 and plain["rounds"] == 2 and "epsilon" not in plain
    dp = privacy_block(tiny(tmp_path, "federated.dp=true", "federated.noise_multiplier=1.5"), n_clients=3, rounds_run=2)
    assert dp["epsilon"] == pytest.approx(client_level_epsilon(1.5, 2, 1 / 3))
    assert dp["delta"] == pytest.approx(1 / 3) and dp["noise_multiplier"] == 1.5 and dp["clipping_norm"] == 1.0


def test_clients_per_round_follow_flower_sampling(tmp_path):
    fed = tiny(tmp_path, "federated.fraction_fit=0.1").federated
    assert sampled_clients(fed, 943) == 94  # int(943 * 0.1)
    assert sampled_clients(fed, 5) == 2  # min_clients floor
    assert sampled_clients(tiny(tmp_path).federated, 3) == 3


@pytest.mark.parametrize("extra", [(), ("federated.dp=true", "federated.noise_multiplier=1.0")])
def test_a_round_that_starts_while_a_client_registers_still_samples_them_all(tmp_path, extra):
    """Flower sizes a round from the clients registered at that instant, then waits for
    min_available_clients: 2 of 3 silos registered must still give a round of 3 (CI once saw 2)."""
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy

    class Proxy(ClientProxy):  # what Flower registers per node; only its cid is used here
        get_properties = get_parameters = fit = evaluate = reconnect = None

    cfg = tiny(tmp_path, *extra)
    strategy = build_strategy(cfg.federated, 3, [np.zeros(2, np.float32)], RoundBook(2, 5, "val/ndcg@10", False))
    inner = getattr(strategy, "strategy", strategy)  # the DP wrapper delegates sampling
    assert inner.num_fit_clients(2) == (3, 3) and inner.num_evaluation_clients(2) == (3, 3)
    manager = SimpleClientManager()
    for cid in "ab":
        manager.register(Proxy(cid))
    late = threading.Timer(0.2, lambda: manager.register(Proxy("c")))
    late.start()
    sampled = strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2, np.float32)]), manager)
    late.join()
    assert sorted(proxy.cid for proxy, _ in sampled) == ["a", "b", "c"]


def test_invalid_combinations_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.use_user_id"):
        check(tiny(tmp_path, "model.use_user_id=true"))
    with pytest.raises(ConfigError, match="federated.dp: needs strategy fedavg or fedprox"):
        check(tiny(tmp_path, "federated.dp=true", "federated.strategy=fedadam"))
    with pytest.raises(ConfigError, match="federated.strategy"):
        tiny(tmp_path, "federated.strategy=fedsgd")


def test_proximal_term_is_half_the_squared_distance(tmp_path):
    cfg = tiny(tmp_path)
    data = prepare(cfg)
    model = build_model(cfg, data.dataset, context(cfg, data.dataset), CPU)
    anchor = [p.detach().clone() - 1.0 for p in model.parameters()]  # every weight 1 away
    n = sum(p.numel() for p in model.parameters())
    assert proximal_term(model, anchor).item() == pytest.approx(0.5 * n)


# -- real Flower simulations ---------------------------------------------------------------------
def _audit(folder) -> list[dict]:
    return [pickle.loads(open(f, "rb").read()) for f in sorted(glob.glob(f"{folder}/*.pkl"))]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """3 clients, 2 rounds of FedAvg, every outgoing client message captured by the audit mod."""
    root = tmp_path_factory.mktemp("fl")
    cfg = tiny(root, f"federated.audit_dir={root}/audit", "federated.patience=5")
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    seed_everything(cfg.trainer.seed)
    model = build_model(cfg, data.dataset, ctx, CPU)
    initial = [v.detach().clone().numpy() for v in model.state_dict().values()]
    parts = client_partitions(cfg, data, ctx)
    book = simulate(cfg, model, parts, ctx, root / "clients")
    return cfg, model, parts, initial, book, _audit(root / "audit")


@pytest.mark.ray
def test_simulation_changes_the_global_weights(simulated):
    cfg, model, parts, initial, book, _ = simulated
    assert book.rounds_run == 2 and [row["round"] for row in book.history] == [1.0, 2.0]
    assert all(row["federated/clients_fit"] == 3 and row["federated/clients_evaluate"] == 3 for row in book.history)
    assert len(book.weights) == len(initial)
    changed = [not np.allclose(w, i) for w, i in zip(book.weights, initial)]
    assert all(changed), "every tensor (embeddings and MLPs) moves"
    assert all(np.isfinite(row["val/ndcg@10"]) and 0 <= row["val/ndcg@10"] <= 1 for row in book.history)
    import ray

    assert not ray.is_initialized()  # the simulation shut Ray down


@pytest.mark.ray
def test_global_weights_are_the_fedavg_of_what_clients_sent(simulated):
    from flwr.common import bytes_to_ndarray

    _, _, parts, _, book, audit = simulated
    replies = [r for r in audit if r["message_type"] == "train" and r["server_round"] == 2]
    assert len(replies) == 3
    arrays, weights = [], []
    for r in replies:
        record = r["content"].array_records["fitres.parameters"]
        arrays.append([bytes_to_ndarray(a.data) for a in record.values()])
        weights.append(r["content"].metric_records["fitres.num_examples"]["num_examples"])
    assert sorted(weights) == sorted(len(p.users) for p in parts)  # weighted by users per client
    for i, global_w in enumerate(book.weights):
        expected = sum(w * a[i] for w, a in zip(weights, arrays)) / sum(weights)
        np.testing.assert_allclose(global_w, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_clients_send_only_weight_arrays_and_scalar_metrics(simulated):
    from flwr.common import bytes_to_ndarray

    _, model, parts, _, _, audit = simulated
    shapes = [tuple(v.shape) for v in model.state_dict().values()]
    assert {r["message_type"] for r in audit} == {"train", "evaluate"}
    assert sum(r["message_type"] == "train" for r in audit) == 6  # 3 clients x 2 rounds
    scalar_keys = {"train_loss", "local_steps", "loss", "ndcg@10", "precision@10", "recall@10", "map@10"}
    for r in audit:
        content = r["content"]
        if r["message_type"] == "train":
            assert list(content.array_records) == ["fitres.parameters"]
            sent = [bytes_to_ndarray(a.data) for a in content.array_records["fitres.parameters"].values()]
            assert [a.shape for a in sent] == shapes  # exactly the model's tensors ...
            assert all(a.dtype == np.float32 for a in sent)  # ... as floats: no id or index arrays
        else:
            assert len(content.array_records) == 0
        for name, record in content.metric_records.items():
            assert name.endswith((".num_examples", ".loss")), name
            assert all(isinstance(v, (int, float)) for v in record.values())
        for name, record in content.config_records.items():
            if name.endswith(".status"):
                assert dict(record) == {"code": 0, "message": "Success"}
                continue
            assert name.endswith(".metrics"), name
            assert set(record) <= scalar_keys, set(record) - scalar_keys
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())
        # a handful of scalars per message, nothing list-like that could carry rows or ids
        assert sum(len(rec) for rec in content.metric_records.values()) + sum(len(rec) for rec in content.config_records.values()) <= 12
    # the only integers sent are counts: each client's number of (validation) users
    counts = {r["content"].metric_records[f"{'fitres' if r['message_type'] == 'train' else 'evaluateres'}.num_examples"]["num_examples"] for r in audit}
    assert counts <= {len(p.users) for p in parts} | {int((np.diff(p.val[0]) > 0).sum()) for p in parts}


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    """The pipeline end to end in federated mode, with client-level DP and SecAgg+ on."""
    from training.pipeline import train

    root = tmp_path_factory.mktemp("flrun")
    cfg = tiny(root, "federated.dp=true", "federated.secagg=true", "federated.noise_multiplier=0.5", "federated.clipping_norm=2.0")
    return root, cfg, train(cfg)


@pytest.mark.ray
def test_pipeline_writes_the_privacy_block_into_the_manifest(federated_run):
    root, cfg, result = federated_run
    manifest = json.loads((root / "artifacts" / "manifest.json").read_text())
    privacy = manifest["provenance"]["privacy"]
    ledger = privacy.pop("ledger")  # the store's privacy-budget ledger recorded this client-level DP release
    assert privacy == result.fit.privacy
    assert ledger["entry"] == 1 and ledger["releases"] == 1 and ledger["cumulative_epsilon"] == pytest.approx(privacy["epsilon"])
    assert ledger["cumulative_delta"] == pytest.approx(privacy["delta"])
    assert privacy["mode"] == "federated" and privacy["strategy"] == "fedavg" and privacy["partition"] == "silos"
    assert privacy["clients"] == 3 and privacy["clients_per_round"] == 3 and privacy["rounds"] == 2
    assert privacy["secure_aggregation"] is True and privacy["client_dp"] is True
    assert privacy["release"].startswith("the last round") and result.fit.best_epoch == result.fit.epochs_run == 2
    assert privacy["epsilon"] == pytest.approx(client_level_epsilon(0.5, 2, 1 / 3)) and privacy["epsilon"] > 0
    assert (privacy["delta"], privacy["noise_multiplier"], privacy["clipping_norm"]) == (pytest.approx(1 / 3), 0.5, 2.0)
    assert math.isfinite(result.metrics["test/ndcg@10"])


@pytest.mark.ray
def test_pipeline_logs_every_round_to_mlflow(federated_run):
    from mlflow import MlflowClient

    root, cfg, result = federated_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    for key in ("train/loss", "val/ndcg_at_10", "val/loss", "federated/clients_fit"):
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
    ndcg = sorted(client.get_metric_history(result.run_id, "val/ndcg_at_10"), key=lambda m: m.step)
    assert [m.value for m in ndcg] == pytest.approx([row["val/ndcg@10"] for row in result.fit.history])
    run = client.get_run(result.run_id)
    assert run.data.metrics["privacy/epsilon"] == pytest.approx(result.fit.privacy["epsilon"])
    assert run.data.params["privacy.mode"] == "federated" and run.data.params["privacy.fl_secagg"] == "True"
