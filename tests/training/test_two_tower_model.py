"""Two-tower model: output shapes, unit norms, TorchRec tables, hand-computed pooling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, PoolingType

from training.model import GENRES, HISTORY, ITEM_ID, USER_ID, ItemArch, TowerSpec, TwoTower, UserArch

SPEC = TowerSpec(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=3, use_user_id=True, temperature=0.25)


def kjt(features: dict[str, list[list[int]]], weights: dict[str, list[list[float]]] | None = None) -> KeyedJaggedTensor:
    """KJT from {key: one list of ids per example}, keys in the given order.

    With `weights` the KJT is weighted (the user arch's EBC is): keys missing from `weights`
    get weight 1 per id; the weights are given by hand, not computed by the code under test."""
    keys, lengths, values, w = [], [], [], []
    for key, rows in features.items():
        keys.append(key)
        lengths += [len(r) for r in rows]
        values += [v for r in rows for v in r]
        if weights is not None:
            w += [x for r in weights[key] for x in r] if key in weights else [1.0] * sum(len(r) for r in rows)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        weights=None if weights is None else torch.tensor(w, dtype=torch.float32),
    )


def configs(ebc: EmbeddingBagCollection) -> dict[str, tuple[int, int, list[str], PoolingType]]:
    return {c.name: (c.num_embeddings, c.embedding_dim, list(c.feature_names), c.pooling) for c in ebc.embedding_bag_configs()}


@pytest.fixture()
def model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(SPEC).eval()


USERS = {HISTORY: [[1, 4], [], [0, 2, 6]], USER_ID: [[0], [3], [5]]}  # user 2 uses the OOV row 5 = n_users
MEAN_WEIGHTS = {HISTORY: [[1 / 2, 1 / 2], [], [1 / 3, 1 / 3, 1 / 3]]}  # per-user weights summing to 1: a mean
ITEMS = {ITEM_ID: [[0], [3], [6]], GENRES: [[0, 2], [], [1]]}


def users_kjt(weights=MEAN_WEIGHTS) -> KeyedJaggedTensor:
    return kjt(USERS, weights)


def test_tables_are_torchrec_embedding_bag_collections(model):
    assert isinstance(model.user_arch.ebc, EmbeddingBagCollection)
    assert isinstance(model.item_arch.ebc, EmbeddingBagCollection)
    # user side: a WEIGHTED EBC, every table SUM-pooled (the per-user weights make the history a mean);
    # history bag over items + user-id table with n_users + 1 rows (the last is OOV)
    assert model.user_arch.ebc.is_weighted() and not model.item_arch.ebc.is_weighted()
    assert configs(model.user_arch.ebc) == {
        "t_history": (7, 4, [HISTORY], PoolingType.SUM),
        "t_user_id": (5 + 1, 4, [USER_ID], PoolingType.SUM),
    }
    assert model.spec.user_oov_index == 5
    # item side: the id table has n_items + 1 rows (the last is the OOV row for never-trained items)
    assert configs(model.item_arch.ebc) == {
        "t_item_id": (7 + 1, 4, [ITEM_ID], PoolingType.SUM),
        "t_genres": (3, 4, [GENRES], PoolingType.MEAN),
    }
    assert model.spec.item_oov_index == 7
    assert model.spec.user_features() == [HISTORY, USER_ID] and model.spec.item_features() == [ITEM_ID, GENRES]
    # the weights are real tensors of those sizes (not meta)
    assert model.user_arch.ebc.embedding_bags["t_user_id"].weight.shape == (6, 4)
    assert model.item_arch.ebc.embedding_bags["t_item_id"].weight.shape == (8, 4)
    assert model.item_arch.ebc.embedding_bags["t_genres"].weight.shape == (3, 4)
    assert not model.user_arch.ebc.embedding_bags["t_history"].weight.is_meta
    # MLP input = one embedding per table
    assert model.user_arch.mlp[0].in_features == 2 * 4
    assert model.item_arch.mlp[0].in_features == 2 * 4
    assert model.user_arch.mlp[-1].out_features == 3


def test_default_spec_is_the_ids_only_two_tower():
    spec = TowerSpec(n_users=5, n_items=7, n_genres=3)
    assert (spec.use_user_id, spec.use_genres, spec.use_content, spec.use_demographics, spec.use_stated) == (False, True, False, False, False)
    assert spec.user_features() == [HISTORY] and spec.item_features() == [ITEM_ID, GENRES]


def test_optional_tables_can_be_switched_off():
    spec = TowerSpec(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=3, use_user_id=False, use_genres=False)
    m = TwoTower(spec)
    assert list(configs(m.user_arch.ebc)) == ["t_history"]
    assert list(configs(m.item_arch.ebc)) == ["t_item_id"]
    assert m.user_arch.mlp[0].in_features == 4 and m.item_arch.mlp[0].in_features == 4
    out = m.user_arch(kjt({HISTORY: [[1, 2], [3]]}, {HISTORY: [[0.5, 0.5], [1.0]]}))
    assert out.shape == (2, 3)
    assert m.item_arch(kjt({ITEM_ID: [[0], [1], [2]]})).shape == (3, 3)


def test_output_shapes_and_unit_norm(model):
    user = model.user_arch(users_kjt())
    item = model.item_arch(kjt(ITEMS))
    assert user.shape == (3, SPEC.output_dim) and item.shape == (3, SPEC.output_dim)
    torch.testing.assert_close(user.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(item.norm(dim=1), torch.ones(3))
    logits = model(users_kjt(), kjt(ITEMS))
    assert logits.shape == (3, 3)
    # logits are cosine / temperature: |logit| <= 1 / 0.25 = 4, and equal u @ v.T / 0.25
    torch.testing.assert_close(logits, user @ item.T / 0.25)
    assert logits.abs().max() <= 4.0 + 1e-5


def test_user_tower_is_mean_of_history_rows_then_mlp(model):
    arch: UserArch = model.user_arch
    hist_w = arch.ebc.embedding_bags["t_history"].weight.detach()
    uid_w = arch.ebc.embedding_bags["t_user_id"].weight.detach()
    # user 0: history {1, 4} weights 1/2 -> bag (W[1] + W[4]) / 2; id row 0
    # user 1: empty history -> bag of zeros; id row 3
    # user 2: history {0, 2, 6} weights 1/3 -> (W[0] + W[2] + W[6]) / 3; OOV id row 5
    bags = torch.stack([(hist_w[1] + hist_w[4]) / 2, torch.zeros(4), (hist_w[0] + hist_w[2] + hist_w[6]) / 3])
    ids = uid_w[[0, 3, 5]]
    pooled = arch.ebc(users_kjt())
    torch.testing.assert_close(pooled[HISTORY], bags)
    torch.testing.assert_close(pooled[USER_ID], ids)
    assert torch.count_nonzero(pooled[HISTORY][1]) == 0  # empty history -> zero bag
    expected = F.normalize(arch.mlp(torch.cat([bags, ids], dim=1)), dim=-1)
    torch.testing.assert_close(arch(users_kjt()), expected)


def test_user_tower_history_bag_is_weighted_by_the_given_weights(model):
    """Rating-weighted history: the SUM pool applies the per-item weights (here 0.8 / 0.2 and 0.5 / 0.3 / 0.2)."""
    arch: UserArch = model.user_arch
    hist_w = arch.ebc.embedding_bags["t_history"].weight.detach()
    rated = {HISTORY: [[0.8, 0.2], [], [0.5, 0.3, 0.2]]}
    pooled = arch.ebc(users_kjt(rated))[HISTORY]
    torch.testing.assert_close(pooled, torch.stack([0.8 * hist_w[1] + 0.2 * hist_w[4], torch.zeros(4), 0.5 * hist_w[0] + 0.3 * hist_w[2] + 0.2 * hist_w[6]]))
    # and the weights matter: not the plain mean
    assert (pooled[0] - (hist_w[1] + hist_w[4]) / 2).abs().max() > 1e-4
    assert (arch(users_kjt(rated))[0] - arch(users_kjt())[0]).abs().max() > 1e-5


def test_item_tower_is_id_row_plus_mean_genre_bag(model):
    arch: ItemArch = model.item_arch
    id_w = arch.ebc.embedding_bags["t_item_id"].weight.detach()
    g_w = arch.ebc.embedding_bags["t_genres"].weight.detach()
    # item 0: genres {0, 2} -> (G[0] + G[2]) / 2; item 3: no genre -> zeros; item 6: genre 1 -> G[1]
    genres = torch.stack([(g_w[0] + g_w[2]) / 2, torch.zeros(4), g_w[1]])
    expected = F.normalize(arch.mlp(torch.cat([id_w[[0, 3, 6]], genres], dim=1)), dim=-1)
    torch.testing.assert_close(arch(kjt(ITEMS)), expected)
    # the OOV row (7 = n_items) is a real row of the id table
    oov = arch(kjt({ITEM_ID: [[7]], GENRES: [[1]]}))
    torch.testing.assert_close(oov, F.normalize(arch.mlp(torch.cat([id_w[[7]], g_w[[1]]], dim=1)), dim=-1))


def test_history_changes_the_user_vector(model):
    """The history bag really feeds the tower: a different history gives a different vector."""
    half = {HISTORY: [[0.5, 0.5]]}
    a = model.user_arch(kjt({HISTORY: [[1, 4]], USER_ID: [[0]]}, half))
    b = model.user_arch(kjt({HISTORY: [[2, 3]], USER_ID: [[0]]}, half))
    c = model.user_arch(kjt({HISTORY: [[4, 1]], USER_ID: [[0]]}, half))  # same set, other order: same mean
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(a, c)


def test_gradients_reach_embedding_tables(model):
    model.train()
    logits = model(users_kjt(), kjt(ITEMS))
    logits.sum().backward()
    hist_grad = model.user_arch.ebc.embedding_bags["t_history"].weight.grad
    assert hist_grad is not None
    # rows used by some history get a gradient; rows 3 and 5 appear in no history
    used = hist_grad.abs().sum(1) > 0
    assert used[[0, 1, 2, 4, 6]].all() and not used[[3, 5]].any()
    # item side: rows 0, 3, 6 are used, the OOV row 7 is not
    item_used = model.item_arch.ebc.embedding_bags["t_item_id"].weight.grad.abs().sum(1) > 0
    assert item_used[[0, 3, 6]].all() and not item_used[[1, 2, 4, 5, 7]].any()


@pytest.mark.parametrize("layers, shapes", [
    (0, [(3, 8)]),  # (out, in): one linear map from 4 dims x 2 tables to 3
    (1, [(6, 8), (3, 6)]),  # today's default
    (2, [(6, 8), (6, 6), (3, 6)]),
])  # fmt: skip
def test_hidden_layers_shape_each_towers_mlp(layers, shapes):
    torch.manual_seed(0)
    model = TwoTower(TowerSpec(**{**SPEC.__dict__, "hidden_layers": layers}))
    for arch in (model.user_arch, model.item_arch):
        linears = [m for m in arch.mlp if isinstance(m, torch.nn.Linear)]
        assert [(m.out_features, m.in_features) for m in linears] == shapes
        assert sum(isinstance(m, torch.nn.ReLU) for m in arch.mlp) == layers


def test_linear_user_tower_by_hand():
    """hidden_layers=0: user vector = normalize(W . concat(mean history bag, id row) + b), W set by hand."""
    torch.manual_seed(0)
    model = TwoTower(TowerSpec(**{**SPEC.__dict__, "hidden_layers": 0})).eval()
    arch = model.user_arch
    with torch.no_grad():
        arch.ebc.embedding_bags["t_history"].weight.zero_()
        arch.ebc.embedding_bags["t_history"].weight[1] = torch.tensor([2.0, 0, 0, 0])
        arch.ebc.embedding_bags["t_history"].weight[4] = torch.tensor([0.0, 4, 0, 0])
        arch.ebc.embedding_bags["t_user_id"].weight.zero_()
        (lin,) = arch.mlp
        lin.weight.zero_()
        lin.weight[0, 0], lin.weight[1, 1], lin.weight[2, 0] = 1.0, 1.0, -1.0
        lin.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    # user 0: bag = ([2,0,0,0] + [0,4,0,0]) / 2 = [1, 2, 0, 0] -> W x + b = [1, 2 + 1, -1] = [1, 3, -1], norm sqrt(11)
    # user 1: empty bag -> b = [0, 1, 0]
    out = arch(users_kjt())
    torch.testing.assert_close(out[0], torch.tensor([1.0, 3.0, -1.0]) / 11**0.5)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0, 0.0]))


def test_use_title_switches_only_the_title_table():
    from training.model import TITLE, YEAR

    base = dict(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=3, use_content=True, n_title=9)
    assert TowerSpec(**base).item_features() == [ITEM_ID, GENRES, YEAR, TITLE]  # default: as before
    spec = TowerSpec(**base, use_title=False)
    assert spec.item_features() == [ITEM_ID, GENRES, YEAR]
    m = TwoTower(spec)
    assert list(configs(m.item_arch.ebc)) == ["t_item_id", "t_genres", "t_year"]
    assert m.item_arch.mlp[0].in_features == 3 * 4
    assert TowerSpec(**{**base, "use_content": False}, use_title=True).item_features() == [ITEM_ID, GENRES]  # needs use_content


@pytest.mark.parametrize("item_bias", [False, True])
def test_every_parameter_is_built_on_the_requested_device(item_bias):
    # the MLPs once stayed on the CPU while the tables went to CUDA (found on a GPU run); the meta
    # device stands in for CUDA here
    spec = TowerSpec(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=4, item_bias=item_bias)
    model = TwoTower(spec, device=torch.device("meta"))
    where = {name: p.device.type for name, p in model.named_parameters()}
    assert any(".mlp." in name for name in where) and set(where.values()) == {"meta"}, where
