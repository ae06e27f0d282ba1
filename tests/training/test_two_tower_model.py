"""Two-tower model: output shapes, unit norms, TorchRec tables, hand-computed pooling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, PoolingType

from training.model import GENRES, HISTORY, ITEM_ID, USER_ID, ItemArch, TowerSpec, TwoTower, UserArch

SPEC = TowerSpec(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=3, temperature=0.25)


def kjt(features: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """KJT from {key: one list of ids per example}, keys in the given order."""
    keys, lengths, values = [], [], []
    for key, rows in features.items():
        keys.append(key)
        lengths += [len(r) for r in rows]
        values += [v for r in rows for v in r]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths, dtype=torch.int32)
    )


def configs(ebc: EmbeddingBagCollection) -> dict[str, tuple[int, int, list[str], PoolingType]]:
    return {c.name: (c.num_embeddings, c.embedding_dim, list(c.feature_names), c.pooling) for c in ebc.embedding_bag_configs()}


@pytest.fixture()
def model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(SPEC).eval()


USERS = {HISTORY: [[1, 4], [], [0, 2, 6]], USER_ID: [[0], [3], [5]]}  # user 2 uses the OOV row 5 = n_users
ITEMS = {ITEM_ID: [[0], [3], [6]], GENRES: [[0, 2], [], [1]]}


def test_tables_are_torchrec_embedding_bag_collections(model):
    assert isinstance(model.user_arch.ebc, EmbeddingBagCollection)
    assert isinstance(model.item_arch.ebc, EmbeddingBagCollection)
    # user side: history bag over items (mean) + user-id table with n_users + 1 rows (the last is OOV)
    assert configs(model.user_arch.ebc) == {
        "t_history": (7, 4, [HISTORY], PoolingType.MEAN),
        "t_user_id": (5 + 1, 4, [USER_ID], PoolingType.SUM),
    }
    assert model.spec.user_oov_index == 5
    assert configs(model.item_arch.ebc) == {
        "t_item_id": (7, 4, [ITEM_ID], PoolingType.SUM),
        "t_genres": (3, 4, [GENRES], PoolingType.MEAN),
    }
    # the weights are real tensors of those sizes (not meta)
    assert model.user_arch.ebc.embedding_bags["t_user_id"].weight.shape == (6, 4)
    assert model.item_arch.ebc.embedding_bags["t_genres"].weight.shape == (3, 4)
    # MLP input = one embedding per table
    assert model.user_arch.mlp[0].in_features == 2 * 4
    assert model.item_arch.mlp[0].in_features == 2 * 4
    assert model.user_arch.mlp[-1].out_features == 3


def test_optional_tables_can_be_switched_off():
    spec = TowerSpec(n_users=5, n_items=7, n_genres=3, embedding_dim=4, hidden_dim=6, output_dim=3, use_user_id=False, use_genres=False)
    m = TwoTower(spec)
    assert list(configs(m.user_arch.ebc)) == ["t_history"]
    assert list(configs(m.item_arch.ebc)) == ["t_item_id"]
    assert m.user_arch.mlp[0].in_features == 4 and m.item_arch.mlp[0].in_features == 4
    out = m.user_arch(kjt({HISTORY: [[1, 2], [3]]}))
    assert out.shape == (2, 3)
    assert m.item_arch(kjt({ITEM_ID: [[0], [1], [2]]})).shape == (3, 3)


def test_output_shapes_and_unit_norm(model):
    user = model.user_arch(kjt(USERS))
    item = model.item_arch(kjt(ITEMS))
    assert user.shape == (3, SPEC.output_dim) and item.shape == (3, SPEC.output_dim)
    torch.testing.assert_close(user.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(item.norm(dim=1), torch.ones(3))
    logits = model(kjt(USERS), kjt(ITEMS))
    assert logits.shape == (3, 3)
    # logits are cosine / temperature: |logit| <= 1 / 0.25 = 4, and equal u @ v.T / 0.25
    torch.testing.assert_close(logits, user @ item.T / 0.25)
    assert logits.abs().max() <= 4.0 + 1e-5


def test_user_tower_is_mean_of_history_rows_then_mlp(model):
    arch: UserArch = model.user_arch
    hist_w = arch.ebc.embedding_bags["t_history"].weight.detach()
    uid_w = arch.ebc.embedding_bags["t_user_id"].weight.detach()
    # user 0: history {1, 4} -> bag (W[1] + W[4]) / 2; id row 0
    # user 1: empty history -> bag of zeros; id row 3
    # user 2: history {0, 2, 6} -> (W[0] + W[2] + W[6]) / 3; OOV id row 5
    bags = torch.stack([(hist_w[1] + hist_w[4]) / 2, torch.zeros(4), (hist_w[0] + hist_w[2] + hist_w[6]) / 3])
    ids = uid_w[[0, 3, 5]]
    pooled = arch.ebc(kjt(USERS))
    torch.testing.assert_close(pooled[HISTORY], bags)
    torch.testing.assert_close(pooled[USER_ID], ids)
    assert torch.count_nonzero(pooled[HISTORY][1]) == 0  # empty history -> zero bag
    expected = F.normalize(arch.mlp(torch.cat([bags, ids], dim=1)), dim=-1)
    torch.testing.assert_close(arch(kjt(USERS)), expected)


def test_item_tower_is_id_row_plus_mean_genre_bag(model):
    arch: ItemArch = model.item_arch
    id_w = arch.ebc.embedding_bags["t_item_id"].weight.detach()
    g_w = arch.ebc.embedding_bags["t_genres"].weight.detach()
    # item 0: genres {0, 2} -> (G[0] + G[2]) / 2; item 3: no genre -> zeros; item 6: genre 1 -> G[1]
    genres = torch.stack([(g_w[0] + g_w[2]) / 2, torch.zeros(4), g_w[1]])
    expected = F.normalize(arch.mlp(torch.cat([id_w[[0, 3, 6]], genres], dim=1)), dim=-1)
    torch.testing.assert_close(arch(kjt(ITEMS)), expected)


def test_history_changes_the_user_vector(model):
    """The history bag really feeds the tower: a different history gives a different vector."""
    a = model.user_arch(kjt({HISTORY: [[1, 4]], USER_ID: [[0]]}))
    b = model.user_arch(kjt({HISTORY: [[2, 3]], USER_ID: [[0]]}))
    c = model.user_arch(kjt({HISTORY: [[4, 1]], USER_ID: [[0]]}))  # same set, other order: same mean
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(a, c)


def test_gradients_reach_embedding_tables(model):
    model.train()
    logits = model(kjt(USERS), kjt(ITEMS))
    logits.sum().backward()
    hist_grad = model.user_arch.ebc.embedding_bags["t_history"].weight.grad
    assert hist_grad is not None
    # rows used by some history get a gradient; rows 3 and 5 appear in no history
    used = hist_grad.abs().sum(1) > 0
    assert used[[0, 1, 2, 4, 6]].all() and not used[[3, 5]].any()
