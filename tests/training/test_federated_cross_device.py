"""Cross-device federated learning (issue 17): one user per client, poisson client sampling onto
Flower device slots, server-side validation, client-level DP with the subsampled-Gaussian RDP
accountant. Accounting checked against hand-computed bounds; then one real Flower simulation on
the Ray backend (24 one-user clients, 2 rounds, q = 0.25) whose sampled clients, clipped updates,
fixed-denominator average and reported epsilon are checked against what the clients really sent."""
from __future__ import annotations

import glob
import math
import pickle

import numpy as np
import pytest
import torch

from training.config import ConfigError, load_config
from training.federated.fit import check, client_partitions, privacy_block, simulate
from training.federated.server import client_level_epsilon, device_slots, noise_for_epsilon, noise_multiplier, sampled_clients
from training.pipeline import build_model, context, prepare
from training.trainer import seed_everything

from tests.conftest import REPO, tiny_overrides

CPU = torch.device("cpu")
N_USERS, Q, SIGMA, CLIP = 24, 0.25, 1e-6, 0.5


def cross_device(root, *extra: str):
    """24 synthetic users, one per client, each in a round with probability 0.25, 2 rounds."""
    return load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + [
        "privacy.mode=federated", f"data.synthetic.n_users={N_USERS}", "data.synthetic.n_items=60",
        "data.synthetic.mean_interactions_per_user=10", "model.embedding_dim=8", "model.hidden_dim=8",
        "model.output_dim=8", "tracking.register_model=false", "federated.partition=user", "federated.sampling=poisson",
        "federated.evaluation=server", f"federated.fraction_fit={Q}", "federated.rounds=2", "federated.patience=5",
        "federated.local_batch_size=1", "federated.local_epochs=2", "federated.ray_num_cpus=2",
        "federated.num_cpus_per_client=1", "federated.progress=false", *extra,
    ])  # fmt: skip


# -- accounting and configuration (by hand) -----------------------------------------------------
def test_sampling_amplifies_and_is_bounded_by_the_order_2_rdp():
    sigma, rounds, delta, q = 1.0, 50, 1e-4, 0.01
    eps = client_level_epsilon(sigma, rounds, delta, q)
    assert eps < client_level_epsilon(sigma, rounds, delta)  # q = 1: no amplification
    # order 2 of the poisson-subsampled Gaussian: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^{1/sigma^2}
    # = 1 + q^2 (e^{1/sigma^2} - 1); RDP_2 = rounds * log A_2; Opacus' conversion at order 2 is
    # RDP_2 + log(1/2) - (log delta + log 2); epsilon is the minimum over orders, so at most that
    rdp2 = rounds * math.log(1 + q**2 * (math.exp(1 / sigma**2) - 1))
    assert eps <= rdp2 + math.log(0.5) - (math.log(delta) + math.log(2)) + 1e-12
    assert client_level_epsilon(sigma, rounds, delta, 0.02) > eps  # a larger sample rate costs more


def test_noise_for_epsilon_meets_the_target():
    sigma = noise_for_epsilon(8.0, 300, 1 / 6040, 0.01)
    assert client_level_epsilon(sigma, 300, 1 / 6040, 0.01) <= 8.0
    assert client_level_epsilon(sigma * 0.999, 300, 1 / 6040, 0.01) > 8.0  # the smallest such sigma (to 1e-4)


def test_cross_device_settings_and_their_errors(tmp_path):
    fed = cross_device(tmp_path).federated
    assert sampled_clients(fed, 6040) == 1510  # expected clients per round: round(0.25 * 6040)
    # slots: P(Binomial(24, 0.25) > K) < 1e-9; 24 is the cap (every client at once)
    assert device_slots(24, 0.25) <= 24 and device_slots(6040, 0.01) < 6040 * 0.02
    with pytest.raises(ConfigError, match="federated.evaluation: must be server"):
        check(cross_device(tmp_path, "federated.evaluation=clients"))
    with pytest.raises(ConfigError, match="federated.target_epsilon: needs federated.dp"):
        check(cross_device(tmp_path, "federated.target_epsilon=8"))
    target = cross_device(tmp_path, "federated.dp=true", "federated.target_epsilon=8").federated
    assert noise_multiplier(target, N_USERS) == pytest.approx(noise_for_epsilon(8.0, 2, 1 / N_USERS, Q))


# -- a real Flower simulation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("xdev")
    # sigma ~ 0: the global step is the fixed-denominator average of the clipped updates, checkable
    cfg = cross_device(root, "federated.dp=true", f"federated.noise_multiplier={SIGMA}", f"federated.clipping_norm={CLIP}", f"federated.audit_dir={root}/audit")
    check(cfg)
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    seed_everything(cfg.trainer.seed)
    model = build_model(cfg, data.dataset, ctx, CPU)
    initial = [v.detach().clone().numpy() for v in model.state_dict().values()]
    parts = client_partitions(cfg, data, ctx)
    book = simulate(cfg, model, parts, ctx, root / "clients", data)
    audit = [pickle.loads(open(f, "rb").read()) for f in sorted(glob.glob(f"{root}/audit/*.pkl"))]
    return cfg, data, parts, initial, book, audit


def _sent(reply) -> list[np.ndarray]:
    from flwr.common import bytes_to_ndarray

    return [bytes_to_ndarray(a.data) for a in reply["content"].array_records["fitres.parameters"].values()]


@pytest.mark.ray
def test_each_round_trains_the_clients_poisson_sampling_drew(simulated):
    cfg, data, parts, _, book, audit = simulated
    assert len(parts) == N_USERS and all(len(p.users) == 1 for p in parts)
    rng = np.random.default_rng(cfg.trainer.seed)  # the server's draws: each client with probability q
    drawn = [int((rng.random(N_USERS) < Q).sum()) for _ in range(2)]
    assert [row["federated/clients_fit"] for row in book.history] == drawn
    assert [sum(r["message_type"] == "train" and r["server_round"] == k for r in audit) for k in (1, 2)] == drawn
    assert not any(r["message_type"] == "evaluate" for r in audit)  # evaluation is server-side
    val_users = int((np.diff(data.val[0]) > 0).sum())
    assert all(row["federated/clients_evaluate"] == val_users and 0 <= row["val/ndcg@10"] <= 1 for row in book.history)


@pytest.mark.ray
def test_the_global_step_is_the_clipped_sum_over_q_times_n(simulated):
    _, _, _, initial, book, audit = simulated
    denominator = Q * N_USERS  # fixed: the DP-FedAvg estimator, sensitivity C / (q N)
    previous = [w.astype(np.float64) for w in initial]
    for k in (1, 2):
        sent = [_sent(r) for r in audit if r["message_type"] == "train" and r["server_round"] == k]
        deltas = [[s.astype(np.float64) - p for s, p in zip(arrays, previous)] for arrays in sent]
        for d in deltas:  # fixedclipping_mod: each client's whole update is within C
            assert math.sqrt(sum(float((x**2).sum()) for x in d)) <= CLIP * (1 + 1e-5)
        previous = [p + sum(d[i] for d in deltas) / denominator for i, p in enumerate(previous)]
    for got, expected in zip(book.weights, previous):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # the noise (sigma 1e-6) is far below


@pytest.mark.ray
def test_epsilon_is_reported_with_the_sampling_amplification(simulated, tmp_path):
    cfg, _, parts, _, book, _ = simulated
    block = privacy_block(cfg, len(parts), book.rounds_run)
    assert block["clients"] == N_USERS and block["clients_per_round"] == 6 and block["rounds"] == 2
    assert block["delta"] == pytest.approx(1 / N_USERS) and block["sample_rate"] == Q and block["privacy_unit"] == "user"
    assert "poisson-subsampled" in block["accountant"] and block["noise_multiplier"] == SIGMA
    # the same run at sigma 1: the subsampled figure, below the unamplified one
    sigma1 = privacy_block(cross_device(tmp_path, "federated.dp=true", "federated.noise_multiplier=1.0"), len(parts), book.rounds_run)
    assert sigma1["epsilon"] == pytest.approx(client_level_epsilon(1.0, 2, 1 / N_USERS, Q))
    assert sigma1["epsilon"] < client_level_epsilon(1.0, 2, 1 / N_USERS)


def test_server_evaluation_every_k_rounds_and_the_time_budget():
    from training.federated.server import RoundBook

    scored = []

    def score(weights):
        scored.append(float(weights[0][0]))
        return {"ndcg@10": float(weights[0][0]) / 10}

    book = RoundBook(rounds=5, patience=3, monitor="val/ndcg@10", progress=False, server_eval=score, eval_every=2, eval_users=7)
    for r in range(1, 6):
        book.on_fit([(1, {"train_loss": 1.0})])
        book.on_params(r, [np.full(2, float(r))], {})
    assert scored == [2.0, 4.0, 5.0]  # every 2nd round and the last one
    assert ["val/ndcg@10" in row for row in book.history] == [False, True, False, True, True]
    assert book.best_round == 5 and book.best == pytest.approx(0.5) and book.history[1]["federated/clients_evaluate"] == 7
    late = RoundBook(rounds=5, patience=3, monitor="val/ndcg@10", progress=False, server_eval=score, max_seconds=0.0)
    late.on_fit([(1, {"train_loss": 1.0})])
    late.on_params(1, [np.ones(2)], {})
    assert late.stopped and late.rounds_run == 1  # the budget (0 s) is spent after the first evaluated round
