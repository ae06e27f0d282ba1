"""Retrieval task: full-softmax and sampled-softmax (logQ) losses against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from features.config import SyntheticConfig
from features.content import ItemSide, UserSide, to_csr
from features.synthetic import generate
from training.config import TaskConfig
from training.data import Context, UserBatch, epoch_batches, item_features, rated_csr, user_features
from training.model import ITEM_ID, TowerSpec, TwoTower
from training.task import RetrievalTask

CPU = torch.device("cpu")


def csr(rows):
    return np.cumsum([0] + [len(r) for r in rows]).astype(np.int64), np.array([i for r in rows for i in r], dtype=np.int64)


def genre_ctx(genres, n_users: int = 3) -> Context:
    """A Context that only carries item genres (the pinned towers ignore everything else)."""
    zeros = np.zeros(n_users, np.int64)
    users = UserSide(zeros, zeros, zeros, to_csr([()] * n_users), to_csr([()] * n_users), [], [])
    return Context(users, ItemSide(to_csr(genres), np.zeros(len(genres), np.int64), to_csr([()] * len(genres))))


def fixed_towers(monkeypatch, model: TwoTower, user_vec, item_vec) -> None:
    """Pin the tower outputs: users get `user_vec` rows in batch order, items their row of `item_vec`."""
    U, V = torch.tensor(user_vec, dtype=torch.float32), torch.tensor(item_vec, dtype=torch.float32)
    monkeypatch.setattr(model.user_arch, "forward", lambda features: U)
    monkeypatch.setattr(model.item_arch, "forward", lambda features: V[features[ITEM_ID].values()])


def batch(users, targets) -> UserBatch:
    return UserBatch(np.array(users), None, csr(targets))  # features unused: user tower is pinned


# -- loss selection ----------------------------------------------------------------------------
def test_auto_picks_full_softmax_up_to_the_cap():
    cfg = TaskConfig(full_softmax_max_items=3)
    assert RetrievalTask(cfg, np.ones(3)).loss_kind == "full_softmax"
    assert RetrievalTask(cfg, np.ones(4)).loss_kind == "sampled_softmax"
    assert RetrievalTask(TaskConfig(loss="sampled_softmax"), np.ones(3)).loss_kind == "sampled_softmax"
    assert RetrievalTask(TaskConfig(loss="full_softmax", full_softmax_max_items=1), np.ones(9)).loss_kind == "full_softmax"


def test_log_q_is_smoothed_item_frequency():
    task = RetrievalTask(TaskConfig(), np.array([3.0, 0.0, 1.0]))
    # q = (count + 1) / sum(count + 1) = [4, 1, 2] / 7
    np.testing.assert_allclose(task.log_q.numpy(), np.log([4 / 7, 1 / 7, 2 / 7]), rtol=1e-6)


# -- full softmax ------------------------------------------------------------------------------
def test_full_softmax_hand_computed(monkeypatch):
    model = TwoTower(TowerSpec(n_users=2, n_items=3, n_genres=1, output_dim=2, temperature=0.5))
    # users u0 = (1, 0), u1 = (0, 1); items e0 = (1, 0), e1 = (0, 1), e2 = (-1, 0); T = 0.5
    fixed_towers(monkeypatch, model, [[1, 0], [0, 1]], [[1, 0], [0, 1], [-1, 0]])
    task = RetrievalTask(TaskConfig(loss="full_softmax"), np.ones(3))
    genres = genre_ctx([(0,)] * 3)
    # logits: u0 -> [2, 0, -2], u1 -> [0, 2, 0]
    # user 0, targets {0}:    lse0 = log(e^2 + 1 + e^-2) = 2.142932; loss0 = lse0 - 2 = 0.142932
    # user 1, targets {1, 2}: lse1 = log(2 + e^2) = 2.239545; loss1 = ((lse1 - 2) + (lse1 - 0)) / 2 = 1.239545
    # each user counts once: loss = (loss0 + loss1) / 2 = 0.691238
    lse0, lse1 = math.log(math.e**2 + 1 + math.e**-2), math.log(2 + math.e**2)
    expected = ((lse0 - 2) + ((lse1 - 2) + lse1) / 2) / 2
    assert expected == pytest.approx(0.691238, abs=1e-6)
    loss = task.loss(model, batch([0, 1], [[0], [1, 2]]), genres)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # user order in the batch does not matter
    fixed_towers(monkeypatch, model, [[0, 1], [1, 0]], [[1, 0], [0, 1], [-1, 0]])
    assert task.loss(model, batch([1, 0], [[1, 2], [0]]), genres).item() == pytest.approx(expected, rel=1e-6)


def test_full_softmax_item_weighting_hand_computed(monkeypatch):
    """loss_weighting="item": the three hidden items of the same batch weigh equally, so the
    two-item user counts twice: (loss(u0, 0) + loss(u1, 1) + loss(u1, 2)) / 3."""
    model = TwoTower(TowerSpec(n_users=2, n_items=3, n_genres=1, output_dim=2, temperature=0.5))
    fixed_towers(monkeypatch, model, [[1, 0], [0, 1]], [[1, 0], [0, 1], [-1, 0]])
    task = RetrievalTask(TaskConfig(loss="full_softmax", loss_weighting="item"), np.ones(3))
    lse0, lse1 = math.log(math.e**2 + 1 + math.e**-2), math.log(2 + math.e**2)
    expected = ((lse0 - 2) + (lse1 - 2) + lse1) / 3  # = (0.142932 + 0.239545 + 2.239545) / 3 = 0.874007
    assert expected == pytest.approx(0.874007, abs=1e-6)
    assert task.loss(model, batch([0, 1], [[0], [1, 2]]), genre_ctx([(0,)] * 3)).item() == pytest.approx(expected, rel=1e-6)


def test_set_item_counts_moves_cold_items_and_log_q():
    task = RetrievalTask(TaskConfig(), np.array([3.0, 0.0, 1.0]))
    task.set_item_counts(np.array([0.0, 2.0, 1.0]))  # the refit sees train + val
    assert task.cold.tolist() == [True, False, False]
    np.testing.assert_allclose(task.log_q.numpy(), np.log([1 / 6, 3 / 6, 2 / 6]), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    ds = generate(SyntheticConfig(n_users=48, n_items=30, n_genres=4, mean_interactions_per_user=8, seed=2))
    train = rated_csr(ds.interactions, ds.n_users)
    spec = TowerSpec(n_users=ds.n_users, n_items=ds.n_items, n_genres=4, embedding_dim=16, hidden_dim=16, output_dim=8, use_user_id=True, temperature=0.2)
    return Context.from_dataset(ds), train, spec


def test_full_softmax_matches_independent_computation_on_real_towers(tiny):
    ctx, train, spec = tiny
    torch.manual_seed(0)
    model = TwoTower(spec)
    task = RetrievalTask(TaskConfig(loss="full_softmax"), np.bincount(train[1], minlength=spec.n_items).astype(float))
    b = next(epoch_batches(spec, ctx, train, 16, 0.3, 0.0, np.random.default_rng(0), CPU))
    loss = task.loss(model, b, ctx)
    # independent: log p(item | user) from the tower vectors, averaged over each user's targets, then users
    with torch.no_grad():
        u = model.user_arch(b.features)
        v = model.item_arch(item_features(spec, ctx, CPU))
        log_p = u @ v.T / spec.temperature
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    indptr, targets = b.targets
    per_user = [-log_p[i, targets[indptr[i] : indptr[i + 1]]].mean() for i in range(len(b.users))]
    assert loss.item() == pytest.approx(torch.stack(per_user).mean().item(), rel=1e-5)


# -- sampled softmax with logQ ----------------------------------------------------------------------
USERS3 = [[1, 0], [0, 1], [1, 0]]
ITEMS3 = [[1, 0], [0, 1], [0, 1]]
TARGETS3 = [[0], [2], [2]]  # one target each, so the sampled positive is known: pick = [0, 2, 2]


def test_sampled_softmax_with_log_q_hand_computed(monkeypatch):
    model = TwoTower(TowerSpec(n_users=3, n_items=3, n_genres=1, output_dim=2, temperature=1.0))
    fixed_towers(monkeypatch, model, USERS3, ITEMS3)
    task = RetrievalTask(TaskConfig(loss="sampled_softmax"), np.array([3.0, 0.0, 1.0]))
    # q = [4, 1, 2] / 7; in-batch columns are the picked items [0, 2, 2], log q of those = [a, b, b]
    # with a = log(4/7), b = log(2/7). Scores u.v (T = 1): row0 [1, 0, 0], row1 [0, 1, 1], row2 [1, 0, 0].
    # Columns 1 and 2 are the same item: each is masked (-inf) as the other row's negative.
    #   row0 logits [1 - a, -b, -b]   target col 0 -> CE 0.904832
    #   row1 logits [-a, 1 - b, -inf] target col 1 -> CE 0.168848
    #   row2 logits [1 - a, -inf, -b] target col 2 -> CE 0.858298
    a, b = math.log(4 / 7), math.log(2 / 7)

    def ce(row, i):
        return math.log(sum(math.exp(x) for x in row)) - row[i]

    rows = [ce([1 - a, -b, -b], 0), ce([-a, 1 - b], 1), ce([1 - a, -b], 1)]
    expected = sum(rows) / 3
    assert expected == pytest.approx(0.643993, abs=1e-6)
    assert task.loss(model, batch([0, 1, 2], TARGETS3), genre_ctx([(0,)] * 3)).item() == pytest.approx(expected, rel=1e-6)


def test_log_q_correction_changes_the_loss(monkeypatch):
    model = TwoTower(TowerSpec(n_users=3, n_items=3, n_genres=1, output_dim=2, temperature=1.0))
    fixed_towers(monkeypatch, model, USERS3, ITEMS3)
    b, genres = batch([0, 1, 2], TARGETS3), genre_ctx([(0,)] * 3)
    # uniform counts: log q is a constant shift of every logit, so the loss is the uncorrected one
    #   row0 [1, 0, 0] -> log(e + 2) - 1 = 0.551445
    #   row1 [0, 1, -inf] -> log(1 + e) - 1 = 0.313262
    #   row2 [1, -inf, 0] -> log(e + 1) - 0 = 1.313262      mean 0.725989
    uniform = RetrievalTask(TaskConfig(loss="sampled_softmax"), np.array([5.0, 5.0, 5.0])).loss(model, b, genres).item()
    assert uniform == pytest.approx(((math.log(math.e + 2) - 1) + (math.log(1 + math.e) - 1) + math.log(math.e + 1)) / 3, rel=1e-6)
    skewed = RetrievalTask(TaskConfig(loss="sampled_softmax"), np.array([3.0, 0.0, 1.0])).loss(model, b, genres).item()
    assert abs(skewed - uniform) > 0.05  # 0.644 (hand-computed above) vs 0.726


def test_sampled_softmax_trains_on_real_towers(tiny):
    ctx, train, spec = tiny
    torch.manual_seed(0)
    model = TwoTower(spec)
    task = RetrievalTask(TaskConfig(loss="sampled_softmax"), np.bincount(train[1], minlength=spec.n_items).astype(float))
    b = next(epoch_batches(spec, ctx, train, 64, 0.3, 0.0, np.random.default_rng(0), CPU))  # all 48 users
    assert len(b.users) == 48

    def fixed_loss():
        np.random.seed(0)  # the sampled positive per user comes from numpy's global RNG
        return task.loss(model, b, ctx)

    before = fixed_loss()
    assert torch.isfinite(before) and before.item() > 0
    assert before.requires_grad
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = fixed_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss().item()
    assert math.isfinite(after)
    assert after < 0.7 * before.item(), (before.item(), after)


def test_metrics_keys_range_and_mode_restored(tiny):
    ctx, train, spec = tiny
    torch.manual_seed(0)
    model = TwoTower(spec)
    task = RetrievalTask(TaskConfig(eval_k=5), np.ones(spec.n_items))
    # history = all but the last item of each user, truth = the last
    indptr, indices = train[:2]
    last = np.zeros(len(indices), bool)
    last[indptr[1:] - 1] = True
    hist = (indptr - np.arange(len(indptr)), indices[~last])
    truth = (np.arange(len(indptr)), indices[last])
    model.train()
    m = task.metrics(model, hist, truth, ctx, CPU)
    assert model.training  # restored
    assert {"ndcg@5", "precision@5", "recall@5", "map@5", "coverage"} <= set(m)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    model.eval()
    task.metrics(model, hist, truth, ctx, CPU)
    assert not model.training
    # user embeddings come from the history: same as the user tower on user_features
    with torch.no_grad():
        direct = model.user_arch(user_features(spec, ctx, np.array([0, 1]), hist, CPU))
    torch.testing.assert_close(task.user_embeddings(model, ctx, np.array([0, 1]), hist, CPU), direct)


def test_topk_score_blocks_follow_the_catalog_size_with_the_same_lists(tiny, monkeypatch):
    """The default batch is blend.block_rows(n_items): with a 60-float block and 30 items, 2 users a
    block (24 blocks for 48 users); the lists equal one-user and all-at-once batches."""
    from training import blend

    ctx, train, spec = tiny
    torch.manual_seed(0)
    model = TwoTower(spec)
    task = RetrievalTask(TaskConfig(eval_k=5), np.ones(spec.n_items))
    users = np.arange(spec.n_users)
    whole = task.topk(model, ctx, train, users, CPU, batch_size=len(users))
    np.testing.assert_array_equal(task.topk(model, ctx, train, users, CPU, batch_size=1), whole)
    monkeypatch.setattr(blend, "SCORE_BLOCK", 60)
    calls = []
    embed = task.user_embeddings
    monkeypatch.setattr(task, "user_embeddings", lambda *a: calls.append(len(a[2])) or embed(*a))
    np.testing.assert_array_equal(task.topk(model, ctx, train, users, CPU), whole)
    assert calls == [2] * 24


# -- item-id dropout ---------------------------------------------------------------------------------
def recording_towers(monkeypatch, model: TwoTower, n_users: int) -> list[torch.Tensor]:
    """Pin the towers to constant vectors and record the item ids each item-tower call receives."""
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(model.user_arch, "forward", lambda features: torch.ones(n_users, 2) / math.sqrt(2))

    def item_forward(features):
        seen.append(features[ITEM_ID].values().clone())
        return torch.ones(len(seen[-1]), 2) / math.sqrt(2)

    monkeypatch.setattr(model.item_arch, "forward", item_forward)
    return seen


@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_item_id_dropout_swaps_item_rows_to_the_oov_row_in_the_loss(monkeypatch, loss):
    n = 400
    model = TwoTower(TowerSpec(n_users=n, n_items=n, n_genres=1, output_dim=2))
    seen = recording_towers(monkeypatch, model, n)
    ctx = genre_ctx([(0,)] * n, n_users=n)
    b = batch(np.arange(n), [[i] for i in range(n)])  # one target each: the sampled positive of user i is item i
    np.random.seed(0)
    RetrievalTask(TaskConfig(loss=loss), np.ones(n), item_id_dropout=0.3).loss(model, b, ctx)
    ids = seen[-1].numpy()
    assert len(ids) == n
    assert model.spec.item_oov_index == n
    oov = ids == n
    assert 0.2 < oov.mean() < 0.4  # ~item_id_dropout of the item rows
    np.testing.assert_array_equal(ids[~oov], np.arange(n)[~oov])  # the others keep their own row
    # without dropout every item uses its own row
    RetrievalTask(TaskConfig(loss=loss), np.ones(n)).loss(model, b, ctx)
    np.testing.assert_array_equal(seen[-1].numpy(), np.arange(n))


def test_cold_items_are_the_zero_count_items():
    task = RetrievalTask(TaskConfig(), np.array([3.0, 0.0, 1.0, 0.0]), item_id_dropout=0.1)
    assert task.cold.tolist() == [False, True, False, True]
    assert task.item_id_dropout == 0.1


@pytest.fixture
def prepared_for_catalog(tiny):
    ctx, _, spec = tiny
    spec = TowerSpec(**{**spec.__dict__, "use_genres": True}) if "use_genres" in spec.__dict__ else spec
    return spec, ctx, RetrievalTask(TaskConfig(), np.ones(spec.n_items))


def test_catalog_features_are_built_once_and_equal_the_host_build(prepared_for_catalog):
    """The full-softmax step's whole-catalog features: cached on the device, identical to
    item_features' host build, with item-id dropout drawn by numpy as before and applied in place."""
    spec, ctx, task = prepared_for_catalog
    device = torch.device("cpu")
    first = task.catalog_features(spec, ctx, device)
    ref = item_features(spec, ctx, device)
    assert first.keys() == ref.keys() and torch.equal(first.values(), ref.values()) and torch.equal(first.lengths(), ref.lengths())
    assert task.catalog_features(spec, ctx, device) is first  # no dropout: the very same cached tensors
    task.item_id_dropout = 0.5
    np.random.seed(7)
    dropped = task.catalog_features(spec, ctx, device)
    np.random.seed(7)
    mask = np.random.random(spec.n_items) < 0.5  # the same draw item_features' oov takes
    expected = item_features(spec, ctx, device, oov=mask)
    assert mask.any() and not mask.all()
    assert torch.equal(dropped.values(), expected.values()) and torch.equal(dropped.lengths(), expected.lengths())
    assert torch.equal(first.values(), ref.values())  # the cache itself is never written to
