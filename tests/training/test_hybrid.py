"""Hybrid two-tower (side features): the features.content encoders, the hybrid tables, TorchRec ==
plain torch == ONNX Runtime with every feature on, the item OOV row, stated-genre sampling and
a short end-to-end hybrid run whose bundle re-evaluates to the same test metrics."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, PoolingType

from features.config import SyntheticConfig
from features.content import (
    AGE_EDGES,
    USER_INPUTS,
    YEAR_EDGES,
    ItemSide,
    UserSide,
    age_bucket,
    item_side,
    lookup,
    title_tokens,
    to_csr,
    user_inputs,
    user_side,
    year_bucket,
)
from features.schema import UNKNOWN_AGE, Items, Users
from features.synthetic import OCCUPATIONS, generate
from training.config import TaskConfig, load_config
from training.data import Context, csr_from_mask, epoch_batches, item_features, kjt_from_feed, rated_csr, sample_stated, user_feed
from training.export import PlainUserTower, export_onnx, parity
from training.model import AGE, AVOIDED, GENDER, GENRES, HISTORY, ITEM_ID, LIKED, OCCUPATION, TITLE, USER_ID, YEAR, TowerSpec, TwoTower
from training.task import RetrievalTask

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
ALL_ON = dict(use_user_id=True, use_content=True, use_demographics=True, use_stated=True)
EMPTY = np.zeros(0, np.int64)


def configs(ebc: EmbeddingBagCollection) -> dict[str, tuple[int, int, list[str], PoolingType]]:
    return {c.name: (c.num_embeddings, c.embedding_dim, list(c.feature_names), c.pooling) for c in ebc.embedding_bag_configs()}


def jagged(kjt, key: str) -> list[list[int]]:
    return [t.tolist() for t in kjt[key].to_dense()]


def jagged_weights(kjt, key: str) -> list[list[float]]:
    jt = kjt[key]
    offsets, w = jt.offsets().tolist(), jt.weights().tolist()
    return [w[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its init so that each table visibly contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def rows(csr, users, column: int = 1) -> list[list]:
    return [csr[column][csr[0][u] : csr[0][u + 1]].tolist() for u in users]


# -- features.content ------------------------------------------------------------------------------
def test_age_bucket_movielens_1m_edges():
    ages = [UNKNOWN_AGE, 1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 80]
    out = age_bucket(np.array(ages))
    assert out.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]  # 0 = missing, 1 = "<18", ..., 7 = "56+"
    assert out.dtype == np.int64
    assert age_bucket(30).tolist() == 3 and age_bucket(UNKNOWN_AGE).tolist() == 0
    # 7 buckets + the missing row = the age table of the spec
    assert len(AGE_EDGES) + 2 == TowerSpec(n_users=1, n_items=1, n_genres=1).n_age == 8


def test_year_bucket_decades():
    years = [0, -3, 1895, 1929, 1930, 1939, 1940, 1995, 1999, 2000, 2019, 2020, 2024, 2031]
    out = year_bucket(np.array(years))
    assert out.tolist() == [0, 0, 1, 1, 2, 2, 3, 8, 8, 9, 10, 11, 11, 11]  # 0 = unknown; pre-1930 share bucket 1
    assert out.dtype == np.int64
    assert year_bucket(1987).tolist() == 7
    # the largest bucket is a valid row of the year table the pipeline builds (len(YEAR_EDGES) + 2 rows)
    assert out.max() == len(YEAR_EDGES) + 1 and TowerSpec(n_users=1, n_items=1, n_genres=1).n_year == len(YEAR_EDGES) + 2 == 12


def test_year_bucket_yearly_resolution():
    from features.content import YEARLY_EDGES, year_edges
    from training.pipeline import build_model, context

    assert year_edges("decade") == YEAR_EDGES and year_edges("year") == YEARLY_EDGES
    with pytest.raises(ValueError):
        year_edges("month")
    out = year_bucket(np.array([0, 1895, 1929, 1930, 1994, 1995, 1998, 2029, 2031]), YEARLY_EDGES)
    assert out.tolist() == [0, 1, 1, 2, 66, 67, 70, 101, 101]  # one bucket per year from 1930
    # the config switch reaches the context and the year table size
    cfg = load_config(None, ["data.source=synthetic", "model.use_content=true", "model.year_buckets=year"])
    ds = generate(SyntheticConfig(n_users=20, n_items=15, n_genres=4, mean_interactions_per_user=5, seed=0))
    ctx = context(cfg, ds)
    assert ctx.items.year.tolist() == year_bucket(ds.items.year, YEARLY_EDGES).tolist()
    model = build_model(cfg, ds, ctx, torch.device("cpu"))
    assert model.spec.n_year == len(YEARLY_EDGES) + 2
    model.item_arch(item_features(model.spec, ctx, torch.device("cpu")))  # every bucket is a valid row


def test_title_tokens_are_stable_crc32_buckets():
    # crc32 (not Python's salted hash): the same buckets in every process, so training and serving agree.
    # crc32("toy") = 1728423790, crc32("story") = 3948282936, crc32("schindler") = 2481652792,
    # crc32("s") = 453955339, crc32("list") = 1154021400
    assert title_tokens("Toy Story (1995)", 1000) == [790, 936]  # the year is not a token
    assert title_tokens("Schindler's List (1993)", 1000) == [792, 339, 400]  # punctuation splits
    assert title_tokens("TOY story: toy 2", 1000) == [790, 936]  # lower-cased, repeated tokens once, digits dropped
    assert title_tokens("Schindler's List", 16) == [8, 11, 8]  # distinct tokens may share a bucket
    assert title_tokens("", 1000) == [] and title_tokens("1995 2001", 1000) == []
    many = title_tokens("the quick brown fox jumps over a lazy dog again and again", 7)
    assert len(many) == 11 and all(0 <= b < 7 for b in many)  # 11 distinct words


def test_lookup_is_one_plus_position_zero_for_missing():
    assert lookup(["F", "M"], ["M", "", "X", "F"]).tolist() == [2, 0, 0, 1]
    assert lookup(["a"], []).tolist() == [] and lookup(["a"], []).dtype == np.int64
    assert lookup([], ["a"]).tolist() == [0]


def test_user_inputs_normalizes_history_weights_per_user():
    histories = [np.array([3, 1]), EMPTY, np.array([2, 5, 7]), np.array([4])]
    ratings = [np.array([4.0, 1.0]), np.zeros(0), np.array([5.0, 3.0, 2.0]), np.array([2.0])]
    common = dict(
        user_rows=np.array([0, 1, 2, 3]), age=np.array([1, 0, 7, 2]), gender=np.array([2, 0, 1, 1]), occupation=np.array([3, 0, 1, 2]),
        liked=[np.array([0, 2]), np.array([1]), EMPTY, EMPTY], avoided=[np.array([3]), EMPTY, EMPTY, np.array([0, 1])],
    )  # fmt: skip
    feed = user_inputs(histories, ratings, **common)
    assert list(feed) == list(USER_INPUTS)
    assert feed["history"].tolist() == [3, 1, 2, 5, 7, 4]
    assert feed["history_offsets"].tolist() == [0, 2, 2, 5]
    # by hand: [4, 1] / 5 = [0.8, 0.2]; [5, 3, 2] / 10 = [0.5, 0.3, 0.2]; [2] / 2 = [1]
    np.testing.assert_allclose(feed["history_weights"], [0.8, 0.2, 0.5, 0.3, 0.2, 1.0], rtol=1e-6)
    sums = [feed["history_weights"][s:e].sum() for s, e in ((0, 2), (2, 5), (5, 6))]
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)  # 1 per user with history (the empty one has none)
    assert feed["liked"].tolist() == [0, 2, 1] and feed["liked_offsets"].tolist() == [0, 2, 3, 3]
    assert feed["avoided"].tolist() == [3, 0, 1] and feed["avoided_offsets"].tolist() == [0, 1, 1, 1]
    assert feed["user"].tolist() == [0, 1, 2, 3] and feed["age"].tolist() == [1, 0, 7, 2]
    assert feed["gender"].tolist() == [2, 0, 1, 1] and feed["occupation"].tolist() == [3, 0, 1, 2]
    assert feed["history_weights"].dtype == np.float32
    assert all(v.dtype == np.int64 for k, v in feed.items() if k != "history_weights")
    # without ratings: a plain mean
    plain = user_inputs(histories, None, **common)
    np.testing.assert_allclose(plain["history_weights"], [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1.0], rtol=1e-6)
    # nobody has history: empty bags, offsets still one per user
    empty = user_inputs([EMPTY, EMPTY], None, np.array([0, 1]), np.zeros(2), np.zeros(2), np.zeros(2), [EMPTY, EMPTY], [EMPTY, EMPTY])
    assert empty["history"].tolist() == [] and empty["history_weights"].tolist() == [] and empty["history_offsets"].tolist() == [0, 0]
    assert empty["history_weights"].dtype == np.float32 and empty["liked"].dtype == np.int64


@pytest.fixture(scope="module")
def tiny_dataset():
    """3 users and 6 items with hand-set side tables."""
    base = generate(SyntheticConfig(n_users=3, n_items=6, n_genres=3, mean_interactions_per_user=5, seed=0))
    users = Users(
        age=np.array([UNKNOWN_AGE, 30, 17], np.int32), gender=["", "M", "F"], occupation=["x", "", "a"],
        liked_genres=[(1,), (), (0, 2)], avoided_genres=[(), (2,), ()],
    )  # fmt: skip
    items = Items(title=["Toy Story (1995)", "1995", "", "Toy", "Story", "Schindler's List"], genres=[(0,), (1, 2), (), (2,), (0, 1, 2), (1,)],
                  year=np.array([1995, 0, 1931, 2020, 1929, 1993], np.int32))  # fmt: skip
    return dataclasses.replace(base, users=users, items=items)


def test_user_side_encodes_demographics_and_stated_genres(tiny_dataset):
    side = user_side(tiny_dataset)
    assert side.age.tolist() == [0, 3, 1]
    assert side.gender_vocab == ["F", "M"] and side.gender.tolist() == [0, 2, 1]
    assert side.occupation_vocab == ["a", "x"] and side.occupation.tolist() == [2, 0, 1]
    assert rows(side.liked, range(3)) == [[1], [], [0, 2]] and rows(side.avoided, range(3)) == [[], [2], []]
    assert side.has_stated
    # a source without stated preferences: empty bags for every user
    blank = user_side(dataclasses.replace(tiny_dataset, users=dataclasses.replace(tiny_dataset.users, liked_genres=[], avoided_genres=[])))
    assert not blank.has_stated
    assert rows(blank.liked, range(3)) == [[], [], []] and rows(blank.avoided, range(3)) == [[], [], []]


def test_item_side_encodes_genres_decades_and_title_tokens(tiny_dataset):
    side = item_side(tiny_dataset, 1000)
    assert rows(side.genres, range(6)) == [[0], [1, 2], [], [2], [0, 1, 2], [1]]
    assert side.year.tolist() == [8, 0, 2, 11, 1, 8]
    assert rows(side.title, range(6)) == [[790, 936], [], [], [790], [936], [792, 339, 400]]


# -- hybrid spec ------------------------------------------------------------------------------------
def test_hybrid_spec_tables_names_and_sizes():
    spec = TowerSpec(n_users=6, n_items=9, n_genres=4, embedding_dim=4, hidden_dim=8, output_dim=3, n_gender=3, n_occupation=5, n_title=16, **ALL_ON)
    model = TwoTower(spec)
    assert spec.user_features() == [HISTORY, USER_ID, AGE, GENDER, OCCUPATION, LIKED, AVOIDED]
    assert spec.item_features() == [ITEM_ID, GENRES, YEAR, TITLE]
    assert configs(model.user_arch.ebc) == {
        "t_history": (9, 4, [HISTORY], PoolingType.SUM),
        "t_user_id": (6 + 1, 4, [USER_ID], PoolingType.SUM),
        "t_age": (8, 4, [AGE], PoolingType.SUM),
        "t_gender": (3, 4, [GENDER], PoolingType.SUM),
        "t_occupation": (5, 4, [OCCUPATION], PoolingType.SUM),
        "t_liked": (4, 4, [LIKED], PoolingType.SUM),
        "t_avoided": (4, 4, [AVOIDED], PoolingType.SUM),
    }
    assert configs(model.item_arch.ebc) == {
        "t_item_id": (9 + 1, 4, [ITEM_ID], PoolingType.SUM),
        "t_genres": (4, 4, [GENRES], PoolingType.MEAN),
        "t_year": (12, 4, [YEAR], PoolingType.SUM),
        "t_title": (16, 4, [TITLE], PoolingType.MEAN),
    }
    assert model.user_arch.ebc.is_weighted() and not model.item_arch.ebc.is_weighted()
    assert model.user_arch.feature_names == spec.user_features() and model.item_arch.feature_names == spec.item_features()
    assert model.user_arch.mlp[0].in_features == 7 * 4 and model.item_arch.mlp[0].in_features == 4 * 4
    assert (spec.user_oov_index, spec.item_oov_index) == (6, 9)
    assert model.item_arch.ebc.embedding_bags["t_item_id"].weight.shape == (10, 4)


def test_each_switch_adds_its_own_tables():
    base = dict(n_users=6, n_items=9, n_genres=4)
    assert TowerSpec(**base, use_demographics=True).user_features() == [HISTORY, AGE, GENDER, OCCUPATION]
    assert TowerSpec(**base, use_stated=True).user_features() == [HISTORY, LIKED, AVOIDED]
    assert TowerSpec(**base, use_content=True).user_features() == [HISTORY]
    assert TowerSpec(**base, use_content=True).item_features() == [ITEM_ID, GENRES, YEAR, TITLE]
    assert TowerSpec(**base, use_content=True, use_genres=False).item_features() == [ITEM_ID, YEAR, TITLE]
    assert TowerSpec(**base, use_demographics=True, use_stated=True).item_features() == [ITEM_ID, GENRES]


# -- parity with every feature on ---------------------------------------------------------------------
MISSING_DEMOGRAPHICS = [0, 1, 2, 3]  # age / gender / occupation unknown in the data
NO_STATED = [4, 5, 6, 9]
EMPTY_HISTORY = [0, 7, 8, 9]  # 0: stated genres only (no demographics); 7, 8: stated + demographics; 9: demographics only


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    base = generate(SyntheticConfig(n_users=30, n_items=24, n_genres=5, mean_interactions_per_user=6, seed=3))
    u = base.users
    age, gender, occupation = u.age.copy(), list(u.gender), list(u.occupation)
    liked, avoided = list(u.liked_genres), list(u.avoided_genres)
    for i in MISSING_DEMOGRAPHICS:
        age[i], gender[i], occupation[i] = UNKNOWN_AGE, "", ""
    for i in NO_STATED:
        liked[i], avoided[i] = (), ()
    ds = dataclasses.replace(base, users=Users(age, gender, occupation, liked, avoided))
    full = rated_csr(ds.interactions, ds.n_users)
    owner = np.repeat(np.arange(ds.n_users), np.diff(full[0]))
    history = csr_from_mask(full, ~np.isin(owner, EMPTY_HISTORY))
    ctx = Context.from_dataset(ds, title_buckets=32, rating_weighted=True)
    spec = TowerSpec(
        n_users=ds.n_users, n_items=ds.n_items, n_genres=5, embedding_dim=8, hidden_dim=16, output_dim=8,
        n_gender=len(ctx.users.gender_vocab) + 1, n_occupation=len(ctx.users.occupation_vocab) + 1, n_year=len(YEAR_EDGES) + 2, n_title=32, **ALL_ON,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TwoTower(spec).eval()
    perturb(model)
    tower = PlainUserTower(model).eval()
    path = tmp_path_factory.mktemp("hybrid_onnx") / "user_tower.onnx"
    export_onnx(tower, path, user_feed(spec, ctx, np.arange(10, 26), history))  # an example batch with history everywhere
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return SimpleNamespace(ds=ds, ctx=ctx, spec=spec, model=model, tower=tower, path=path, session=session, history=history)


def test_hybrid_fixture_has_the_edge_cases(hybrid):
    c, h = hybrid.ctx, hybrid.history
    lengths = np.diff(h[0])
    assert (lengths[EMPTY_HISTORY] == 0).all() and (np.delete(lengths, EMPTY_HISTORY) > 0).all()
    assert (c.users.age[MISSING_DEMOGRAPHICS] == 0).all() and (c.users.gender[MISSING_DEMOGRAPHICS] == 0).all()
    assert (c.users.occupation[MISSING_DEMOGRAPHICS] == 0).all() and (c.users.age[10:] > 0).all()
    assert rows(c.users.liked, NO_STATED) == [[]] * 4 and all(len(r) == 2 for r in rows(c.users.liked, [0, 7, 8]))
    assert len(h) == 3 and c.rating_weighted  # ratings travel with the history


def three_ways(h, feed):
    with torch.no_grad():
        ref = h.model.user_arch(kjt_from_feed(h.spec, feed, CPU)).numpy()
        plain = h.tower(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
    onnx = h.session.run(None, feed)[0]
    return ref, plain, onnx


def mixed_feed(h, ctx=None):
    """Empty histories (0, 7, 8, 9), data without demographics (0, 1, 2), demographics withheld (12),
    stated-only users (0, 7, 8), no stated genres (4, 9), the OOV user row (20) and a liked override."""
    users = np.array([0, 7, 1, 9, 4, 12, 8, 20, 2])
    demographics = np.array([True, True, True, True, True, False, True, True, True])
    user_index = np.where(users == 20, h.spec.user_oov_index, users)
    return user_feed(h.spec, ctx or h.ctx, users, h.history, user_index, demographics)


BATCHES = {
    "mixed": lambda h: mixed_feed(h),
    "mixed-plain-mean": lambda h: mixed_feed(h, Context(h.ctx.users, h.ctx.items, rating_weighted=False)),
    "stated-only-1": lambda h: user_feed(h.spec, h.ctx, np.array([7]), h.history),
    "nothing-but-demographics-1": lambda h: user_feed(h.spec, h.ctx, np.array([9]), h.history),
    "no-demographics-stated-only-1": lambda h: user_feed(h.spec, h.ctx, np.array([0]), h.history),
    "everyone": lambda h: user_feed(h.spec, h.ctx, np.arange(30), h.history),
    "everyone-demographics-withheld": lambda h: user_feed(h.spec, h.ctx, np.arange(30), h.history, demographics=np.zeros(30, bool)),
    "three-liked-and-two-avoided": lambda h: user_feed(
        h.spec, h.ctx, np.array([7, 12, 4]), h.history, liked=[np.array([0, 2, 4]), EMPTY, np.array([1])], avoided=[EMPTY, np.array([1, 3]), EMPTY]
    ),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_torchrec_plain_onnx_parity_every_feature_on(hybrid, name):
    feed = BATCHES[name](hybrid)
    ref, plain, onnx = three_ways(hybrid, feed)
    n = len(feed["user"])
    assert ref.shape == plain.shape == onnx.shape == (n, hybrid.spec.output_dim)
    assert np.isfinite(onnx).all()
    assert np.abs(ref - plain).max() <= 1e-5
    assert np.abs(ref - onnx).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)


def test_parity_function_on_the_hybrid_tower(hybrid):
    checks = parity(hybrid.model, hybrid.ctx, hybrid.tower, hybrid.path, np.arange(30), hybrid.history)
    assert set(checks) == {"parity/torchrec_vs_plain", "parity/torchrec_vs_onnx"}
    assert max(checks.values()) <= 1e-5


def test_every_side_input_reaches_the_exported_tower(hybrid):
    """Parity must not hold because both sides ignore an input: each one changes the ONNX output."""
    h = hybrid
    users = np.array([12, 15])  # history, ratings, demographics and stated genres all present
    base = h.session.run(None, user_feed(h.spec, h.ctx, users, h.history))[0]
    variants = {
        "plain mean instead of rating weights": user_feed(h.spec, Context(h.ctx.users, h.ctx.items, False), users, h.history),
        "demographics withheld": user_feed(h.spec, h.ctx, users, h.history, demographics=np.array([False, False])),
        "other liked genres": user_feed(h.spec, h.ctx, users, h.history, liked=[np.array([4]), np.array([3])]),
        "no avoided genres": user_feed(h.spec, h.ctx, users, h.history, avoided=[EMPTY, EMPTY]),
        "OOV user row": user_feed(h.spec, h.ctx, users, h.history, user_index=np.full(2, h.spec.user_oov_index)),
    }
    for what, feed in variants.items():
        ref, _, onnx = three_ways(h, feed)
        assert np.abs(ref - onnx).max() <= 1e-5, what
        assert np.abs(onnx - base).max() > 1e-4, what
    ratings = rows(h.history, users, 2)
    assert all(len(set(r)) > 1 for r in ratings)  # the rating weights really differ from a mean for these users


def test_stated_genre_bags_are_means_and_history_is_rating_weighted(hybrid):
    h = hybrid
    ebc = h.model.user_arch.ebc
    w = {name.removeprefix("t_"): bag.weight.detach() for name, bag in ebc.embedding_bags.items()}
    users = np.array([7, 0, 9, 12])
    feed = user_feed(h.spec, h.ctx, users, h.history)
    with torch.no_grad():
        pooled = ebc(kjt_from_feed(h.spec, feed, CPU))
    liked7, avoided7 = h.ds.users.liked_genres[7], h.ds.users.avoided_genres[7]
    assert len(liked7) == 2 and len(avoided7) == 1
    # user 7: liked {a, b} -> (L[a] + L[b]) / 2; avoided {g} -> A[g]; empty history -> zeros
    torch.testing.assert_close(pooled[LIKED][0], (w[LIKED][liked7[0]] + w[LIKED][liked7[1]]) / 2)
    torch.testing.assert_close(pooled[AVOIDED][0], w[AVOIDED][avoided7[0]])
    assert torch.count_nonzero(pooled[HISTORY][0]) == 0
    # user 0: demographics missing in the data -> row 0 of each table
    for key in (AGE, GENDER, OCCUPATION):
        torch.testing.assert_close(pooled[key][1], w[key][0])
    # user 9: no stated genres -> zero bags
    assert torch.count_nonzero(pooled[LIKED][2]) == 0 and torch.count_nonzero(pooled[AVOIDED][2]) == 0
    # user 12: history weighted by rating, sum r_i H[i] / sum r_i, by hand
    items, ratings = rows(h.history, [12])[0], rows(h.history, [12], 2)[0]
    expected = sum(r * w[HISTORY][i] for i, r in zip(items, ratings)) / sum(ratings)
    torch.testing.assert_close(pooled[HISTORY][3], expected)
    torch.testing.assert_close(pooled[AGE][3], w[AGE][h.ctx.users.age[12]])
    torch.testing.assert_close(pooled[USER_ID][3], w[USER_ID][12])
    # three liked genres -> their mean, in the TorchRec bag and in the exported plain bag
    feed3 = user_feed(h.spec, h.ctx, np.array([7]), h.history, liked=[np.array([0, 2, 4])])
    with torch.no_grad():
        three = ebc(kjt_from_feed(h.spec, feed3, CPU))[LIKED][0]
        plain = h.tower.bags[LIKED](torch.from_numpy(feed3["liked"]), torch.from_numpy(feed3["liked_offsets"]))[0]
    torch.testing.assert_close(three, (w[LIKED][0] + w[LIKED][2] + w[LIKED][4]) / 3)
    torch.testing.assert_close(plain, three)


# -- the item OOV row -----------------------------------------------------------------------------------
def test_id_dropout_swaps_the_item_row_to_the_oov_row(hybrid):
    h = hybrid
    arch = h.model.item_arch
    id_w = arch.ebc.embedding_bags["t_item_id"].weight.detach()
    items = np.array([3, 5, 3])
    with torch.no_grad():
        pooled = arch.ebc(item_features(h.spec, h.ctx, CPU, items, oov=np.array([False, False, True])))
        out = arch(item_features(h.spec, h.ctx, CPU, items, oov=np.array([False, False, True])))
    torch.testing.assert_close(pooled[ITEM_ID][0], id_w[3])
    torch.testing.assert_close(pooled[ITEM_ID][2], id_w[h.spec.item_oov_index])
    for key in (GENRES, YEAR, TITLE):  # the content of item 3 is kept
        torch.testing.assert_close(pooled[key][2], pooled[key][0])
    expected = F.normalize(arch.mlp(torch.cat([pooled[k] for k in h.spec.item_features()], dim=1)), dim=-1)
    torch.testing.assert_close(out, expected)
    assert (out[2] - out[0]).abs().max() > 1e-4


def test_item_id_dropout_trains_the_oov_row_only_when_on(hybrid):
    h = hybrid
    batch = next(epoch_batches(h.spec, h.ctx, h.history, 32, 0.3, 0.0, np.random.default_rng(0), CPU))
    grads = {}
    for dropout in (0.0, 0.5):
        model = copy.deepcopy(h.model).train()
        np.random.seed(0)
        RetrievalTask(TaskConfig(loss="full_softmax"), np.ones(h.spec.n_items), item_id_dropout=dropout).loss(model, batch, h.ctx).backward()
        grads[dropout] = model.item_arch.ebc.embedding_bags["t_item_id"].weight.grad
    oov = h.spec.item_oov_index
    assert grads[0.0] is not None and torch.count_nonzero(grads[0.0][oov]) == 0  # never looked up
    assert torch.count_nonzero(grads[0.5][oov]) > 0


def cold_setup():
    """Items 1, 4, 5 have no training data; 1 and 4 share all content, 5 has other genres; 2 is a
    warm item with the content of 1."""
    genres = [(0,), (1,), (1,), (0, 2), (1,), (2,)]
    users = UserSide(np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64), to_csr([(), ()]), to_csr([(), ()]), [], [])
    ctx = Context(users, ItemSide(to_csr(genres), np.full(6, 5, np.int64), to_csr([(3,)] * 6)))
    spec = TowerSpec(n_users=2, n_items=6, n_genres=3, embedding_dim=8, hidden_dim=16, output_dim=8, use_content=True, n_title=8)
    torch.manual_seed(0)
    model = TwoTower(spec).eval()
    perturb(model, seed=1)
    counts = np.array([5.0, 0.0, 3.0, 2.0, 0.0, 0.0])
    return ctx, spec, model, RetrievalTask(TaskConfig(), counts)


def test_item_embeddings_put_never_trained_items_on_the_oov_row():
    ctx, spec, model, task = cold_setup()
    assert task.cold.tolist() == [False, True, False, False, True, True]
    vec = task.item_embeddings(model, ctx, CPU)
    with torch.no_grad():
        own_rows = model.item_arch(item_features(spec, ctx, CPU))
        oov_rows = model.item_arch(item_features(spec, ctx, CPU, oov=np.ones(6, bool)))
    warm, cold = [0, 2, 3], [1, 4, 5]
    torch.testing.assert_close(vec[warm], own_rows[warm])
    torch.testing.assert_close(vec[cold], oov_rows[cold])
    assert (vec[cold] - own_rows[cold]).abs().max() > 1e-4  # not their own (untrained) id rows
    # cold items depend on content only: same content -> same vector, other genres -> another vector
    torch.testing.assert_close(vec[1], vec[4])
    assert (vec[5] - vec[1]).abs().max() > 1e-4
    assert (vec[2] - vec[1]).abs().max() > 1e-4  # a warm item with the same content keeps its own id row
    # moving a cold item's own id row changes nothing; moving the OOV row moves every cold item only
    id_w = model.item_arch.ebc.embedding_bags["t_item_id"].weight
    with torch.no_grad():
        id_w[[1, 4, 5]] += 1.0
    torch.testing.assert_close(task.item_embeddings(model, ctx, CPU), vec)
    with torch.no_grad():
        id_w[spec.item_oov_index] += 1.0
    moved = task.item_embeddings(model, ctx, CPU)
    torch.testing.assert_close(moved[warm], vec[warm])
    assert ((moved[cold] - vec[cold]).abs().amax(dim=1) > 1e-4).all()


# -- stated genres for data without them ----------------------------------------------------------------
def test_sample_stated_draws_liked_from_history_genres_and_avoided_from_absent_ones():
    genres = [(0,), (1, 2), (2,), (3,), (0, 4), (5,)]
    users = UserSide(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), to_csr([()]), to_csr([()]), [], [])
    ctx = Context(users, ItemSide(to_csr(genres), np.zeros(6, np.int64), to_csr([()] * 6)))
    histories = [np.array([0, 1]), np.array([3]), EMPTY, np.arange(6), np.array([0, 4, 3])]
    present = [{0, 1, 2}, {3}, set(), set(range(6)), {0, 3, 4}]
    rng = np.random.default_rng(0)
    sizes: list[set[int]] = [set() for _ in histories]
    avoided_drawn = np.zeros(len(histories))
    liked_count = np.zeros((len(histories), 6))
    draws = 300
    for _ in range(draws):
        liked, avoided = sample_stated(ctx, histories, rng)
        assert len(liked) == len(avoided) == len(histories)
        for i, (like, avoid) in enumerate(zip(liked, avoided)):
            assert like.dtype == np.int64 and avoid.dtype == np.int64
            like, avoid = like.tolist(), avoid.tolist()
            assert like == sorted(set(like))  # distinct, sorted
            assert set(like) <= present[i], (i, like)
            if present[i]:
                assert 1 <= len(like) <= min(3, len(present[i]))
            else:
                assert like == []
            assert len(avoid) <= 1 and not set(avoid) & present[i] and set(avoid) <= set(range(6)), (i, avoid)
            sizes[i].add(len(like))
            avoided_drawn[i] += len(avoid)
            liked_count[i, like] += 1
    assert sizes[0] == {1, 2, 3} and sizes[1] == {1} and sizes[2] == {0} and sizes[3] == {1, 2, 3}
    assert avoided_drawn[3] == 0  # every genre is in that history: nothing to avoid
    assert 0.35 < avoided_drawn[0] / draws < 0.65 and 0.35 < avoided_drawn[2] / draws < 0.65  # half of the time
    # drawn by share of the history: genre 0 (2 of 4 genre slots) beats genre 3 (1 of 4)
    assert liked_count[4, 0] > liked_count[4, 3] + 20


@pytest.fixture(scope="module")
def stated_data():
    ds = generate(SyntheticConfig(n_users=60, n_items=40, n_genres=5, mean_interactions_per_user=8, seed=7))
    ctx = Context.from_dataset(ds)
    spec = TowerSpec(n_users=ds.n_users, n_items=ds.n_items, n_genres=5, use_demographics=True, use_stated=True,
                     n_gender=len(ctx.users.gender_vocab) + 1, n_occupation=len(ctx.users.occupation_vocab) + 1)  # fmt: skip
    return ds, ctx, spec, rated_csr(ds.interactions, ds.n_users)


def batches(spec, ctx, train, seed=0, **kw):
    return list(epoch_batches(spec, ctx, train, 16, 0.3, 0.0, np.random.default_rng(seed), CPU, **kw))


def test_epoch_batches_use_the_stated_preferences_when_the_data_has_them(stated_data):
    ds, ctx, spec, train = stated_data
    assert ctx.users.has_stated
    seen = []
    for b in batches(spec, ctx, train, demographics_dropout=0.0, stated_dropout=0.0):
        assert b.features.keys() == [HISTORY, AGE, GENDER, OCCUPATION, LIKED, AVOIDED]
        users = b.users.tolist()
        assert jagged(b.features, LIKED) == [list(ds.users.liked_genres[u]) for u in users]
        assert jagged(b.features, AVOIDED) == [list(ds.users.avoided_genres[u]) for u in users]
        assert jagged_weights(b.features, LIKED) == [[0.5, 0.5]] * len(users)  # a mean of the two liked genres
        assert jagged(b.features, AGE) == [[a] for a in ctx.users.age[b.users].tolist()]
        assert jagged(b.features, GENDER) == [[g] for g in ctx.users.gender[b.users].tolist()]
        assert jagged(b.features, OCCUPATION) == [[o] for o in ctx.users.occupation[b.users].tolist()]
        seen += users
    assert sorted(seen) == list(range(ds.n_users))
    # full dropout: no stated genres and no demographics (the "no consent" user)
    for b in batches(spec, ctx, train, demographics_dropout=1.0, stated_dropout=1.0):
        assert jagged(b.features, LIKED) == [[]] * len(b.users) and jagged(b.features, AVOIDED) == [[]] * len(b.users)
        for key in (AGE, GENDER, OCCUPATION):
            assert jagged(b.features, key) == [[0]] * len(b.users)
    # default stated_dropout = 0.5: about half of the users lose their stated genres
    kept = [len(r) > 0 for b in batches(spec, ctx, train) for r in jagged(b.features, LIKED)]
    assert 0.3 < np.mean(kept) < 0.7


def test_epoch_batches_sample_stated_genres_from_history_when_the_data_has_none(stated_data):
    ds, _, spec, train = stated_data
    blank = dataclasses.replace(ds, users=dataclasses.replace(ds.users, liked_genres=[], avoided_genres=[]))
    ctx = Context.from_dataset(blank)
    assert not ctx.users.has_stated
    item_genres = ds.items.genres
    distinct, with_history = set(), 0
    for b in batches(spec, ctx, train, stated_dropout=0.0):
        for hist, like, avoid in zip(jagged(b.features, HISTORY), jagged(b.features, LIKED), jagged(b.features, AVOIDED)):
            present = {g for i in hist for g in item_genres[i]}
            assert set(like) <= present and not set(avoid) & present
            assert (1 <= len(like) <= 3) if hist else like == []
            with_history += bool(hist)
            distinct.add(tuple(like))
    assert with_history > 40 and len(distinct) > 5  # sampled per user, not one constant set


# -- a short hybrid run, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    from training.pipeline import train

    root = tmp_path_factory.mktemp("hybrid_run")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", [
        "model.kind=hybrid", "model.use_content=true", "model.use_demographics=true", "model.use_stated=true",
        "model.rating_weighted=true", "model.item_id_dropout=0.1", "model.title_buckets=64",
        "model.embedding_dim=16", "model.hidden_dim=32", "model.output_dim=16",
        "data.synthetic.n_users=200", "data.synthetic.n_items=200", "data.synthetic.mean_interactions_per_user=12",
        "split.by=user",  # a per-user split leaves some items without training data (cold: the OOV row serves them)
        "trainer.epochs=3", "trainer.progress=false", "tracking.enabled=false", "store.load=false",
        f"export.output_dir={root}/artifacts", f"trainer.checkpoint_dir={root}/checkpoints",
    ])  # fmt: skip
    return SimpleNamespace(root=root, cfg=cfg, result=train(cfg))


def best_model(run) -> TwoTower:
    payload = torch.load(sorted((run.root / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    model = TwoTower(TowerSpec(**payload["spec"])).eval()
    model.load_state_dict(payload["best_state"])
    return model


def test_hybrid_run_exports_a_bundle_that_passes_parity(hybrid_run):
    result, cfg = hybrid_run.result, hybrid_run.cfg
    assert result.run_id is None and result.model_version is None  # tracking off
    assert result.fit.epochs_run == 3
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest == result.manifest
    spec = manifest["model"]["spec"]
    assert (spec["use_content"], spec["use_demographics"], spec["use_stated"], spec["use_user_id"]) == (True, True, True, False)
    assert (spec["n_gender"], spec["n_occupation"], spec["n_year"], spec["n_title"]) == (3, len(OCCUPATIONS) + 1, len(YEAR_EDGES) + 2, 64)
    assert manifest["inputs"] == list(USER_INPUTS)
    features = manifest["features"]
    assert features["user"] == [HISTORY, AGE, GENDER, OCCUPATION, LIKED, AVOIDED]
    assert features["item"] == [ITEM_ID, GENRES, YEAR, TITLE]
    assert features["rating_weighted"] is True
    assert features["gender_vocab"] == ["F", "M"] and features["occupation_vocab"] == sorted(OCCUPATIONS)
    assert set(manifest["parity"]) == {"parity/torchrec_vs_plain", "parity/torchrec_vs_onnx"}
    assert max(manifest["parity"].values()) <= cfg.export.parity_atol == 1e-5
    assert result.metrics["parity/torchrec_vs_onnx"] == manifest["parity"]["parity/torchrec_vs_onnx"]
    assert 0.0 < result.metrics["test/ndcg@10"] <= 1.0


def test_hybrid_bundle_matches_the_trained_torchrec_tower_on_edge_cases(hybrid_run):
    from training.pipeline import context, item_counts, prepare

    cfg, result = hybrid_run.cfg, hybrid_run.result
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    model = best_model(hybrid_run)
    session = ort.InferenceSession(str(result.artifact_dir / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    owner = np.repeat(np.arange(data.dataset.n_users), np.diff(data.seen[0]))
    history = csr_from_mask(data.seen, ~np.isin(owner, [0, 1, 2]))  # users 0-2 lose their history
    users = np.array([0, 1, 2, 3, 4, 5, 6])
    feeds = [
        user_feed(model.spec, ctx, users, history),
        user_feed(model.spec, ctx, users, history, demographics=np.array([False, True, False, True, False, True, False])),
        user_feed(model.spec, ctx, users, history, liked=[EMPTY] * 7, avoided=[EMPTY] * 7),  # 0-2: nothing but demographics
        user_feed(model.spec, ctx, np.array([1]), history),  # stated-only user, batch of 1
    ]
    for feed in feeds:
        with torch.no_grad():
            ref = model.user_arch(kjt_from_feed(model.spec, feed, CPU)).numpy()
        out = session.run(None, feed)[0]
        assert out.shape == ref.shape and np.isfinite(out).all()
        assert np.abs(out - ref).max() <= 1e-5
    # the exported item matrix is the task's: never-trained items on the OOV row
    task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))
    assert task.cold.sum() >= 3  # this split has cold items, some of them in the test truth
    assert (item_counts(data.test, data.dataset.n_items)[task.cold] > 0).any()
    exported = np.load(result.artifact_dir / "item_embeddings.npy")
    np.testing.assert_allclose(exported, task.item_embeddings(model, ctx, CPU).numpy(), atol=1e-6)
    with torch.no_grad():
        own_rows = model.item_arch(item_features(model.spec, ctx, CPU)).numpy()
    assert np.abs(exported[task.cold] - own_rows[task.cold]).max() > 1e-4  # not their own untrained id rows
    np.testing.assert_allclose(exported[~task.cold], own_rows[~task.cold], atol=1e-6)


def test_hybrid_run_trained_the_item_oov_row(hybrid_run):
    """item_id_dropout=0.1: the OOV row got gradients (without id-dropout it is never looked up in training)."""
    from training.pipeline import build_model, context, prepare
    from training.trainer import seed_everything

    cfg = hybrid_run.cfg
    ds = prepare(cfg).dataset
    seed_everything(cfg.trainer.seed)  # the pipeline's init: same seed, same initial weights
    init = build_model(cfg, ds, context(cfg, ds), CPU)
    trained = best_model(hybrid_run)
    oov = trained.spec.item_oov_index
    before = init.item_arch.ebc.embedding_bags["t_item_id"].weight.detach()
    after = trained.item_arch.ebc.embedding_bags["t_item_id"].weight.detach()
    assert before.shape == after.shape == (ds.n_items + 1, cfg.model.embedding_dim)
    assert (after[oov] - before[oov]).abs().max() > 1e-3


def test_offline_evaluation_of_the_hybrid_bundle_reproduces_its_test_metrics(hybrid_run):
    from training.offline import evaluate_bundle

    test = {k: v for k, v in hybrid_run.result.metrics.items() if k.startswith("test/")}
    offline = evaluate_bundle(hybrid_run.cfg, str(hybrid_run.result.artifact_dir))
    assert set(offline) == set(test) and "test/ndcg_at_10" in test
    for k in test:
        assert abs(offline[k] - test[k]) <= 1e-4, (k, offline[k], test[k])


@pytest.mark.parametrize("override", [{"rating_weighted": False}, {"title_buckets": 7}])
def test_offline_evaluation_feeds_the_bundle_as_it_was_built_whatever_the_config_says(hybrid_run, override):
    # a search (search.space) may choose model.rating_weighted: the config a user evaluates with then differs
    # from the bundle's manifest, which is the contract; the metrics are the bundle's own all the same
    from training.offline import evaluate_bundle

    assert hybrid_run.cfg.model.rating_weighted and hybrid_run.cfg.model.title_buckets != 7  # the override changes something
    cfg = hybrid_run.cfg.model_copy(update={"model": hybrid_run.cfg.model.model_copy(update=override)})
    offline = evaluate_bundle(cfg, str(hybrid_run.result.artifact_dir))
    for k, v in hybrid_run.result.metrics.items():
        if k.startswith("test/"):
            assert abs(offline[k] - v) <= 1e-4, (k, offline[k], v)
