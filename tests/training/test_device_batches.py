"""trainer.device_batches (the epoch built with torch ops on the training device), trainer.compile and
trainer.steps_per_epoch, on the CPU: the device path gives the numpy path's batches for the same
draws, and the switches train like the plain run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from features.content import UserSide, to_csr
from tests.conftest import REPO
from training.config import load_config
from training.data import Context, _device_batches, csr_from_mask, device_epoch_batches, gather_rows, user_features
from training.model import AGE, GENDER, HISTORY, OCCUPATION, USER_ID, TowerSpec
from training.pipeline import build_model, context, item_counts, prepare
from training.task import RetrievalTask
from training.trainer import Trainer, seed_everything

CPU = torch.device("cpu")
# users 0..3 with 3, 0, 2 and 1 items (user 1 has none: never a training example)
ROWS = [[0, 2, 5], [], [1, 4], [3]]
RATINGS = np.array([5.0, 1.0, 2.0, 4.0, 4.0, 3.0], np.float32)  # aligned with the CSR's entries


def ctx_for(rating_weighted: bool = False) -> Context:
    empty = to_csr([[]] * 4)
    users = UserSide(np.array([1, 2, 3, 4]), np.array([1, 0, 1, 0]), np.array([2, 1, 0, 3]), empty, empty, ["f"], ["a", "b", "c"])
    return Context(users, None, rating_weighted)  # the user tower never reads item content


def spec(**kw) -> TowerSpec:
    return TowerSpec(n_users=4, n_items=6, n_genres=1, n_gender=2, n_occupation=4, **kw)


def rows_of(kjt, key):
    jt = kjt[key]
    return [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())], [w.tolist() for w in torch.split(jt.weights(), jt.lengths().tolist())]


def epoch(s, ctx, train, batch_size=10, history_dropout=0.0, user_id_dropout=0.0, demographics_dropout=0.0, seed=0):
    return list(device_epoch_batches(s, ctx, train, batch_size, history_dropout, user_id_dropout, np.random.default_rng(seed), CPU, demographics_dropout))


def test_no_dropout_hides_exactly_one_item_per_user_and_keeps_the_rest_as_a_mean_bag():
    train = to_csr(ROWS)
    (batch,) = epoch(spec(), ctx_for(), train)
    assert sorted(batch.users.tolist()) == [0, 2, 3]  # user 1 has no items
    hist, weights = rows_of(batch.features, HISTORY)
    indptr, targets = batch.targets
    for i, u in enumerate(batch.users):
        target = targets[indptr[i] : indptr[i + 1]].tolist()
        assert len(target) == 1 and sorted(hist[i] + target) == ROWS[u]  # one hidden, the rest the input
        assert weights[i] == [1.0 / max(len(hist[i]), 1)] * len(hist[i])  # 3 items: 2 left, 1/2 each; 1 item: none left
    assert batch.features.length_per_key() == [3]  # 2 + 1 + 0 history items, known without a sync


def test_full_dropout_hides_every_item():
    train = to_csr(ROWS)
    batches = epoch(spec(), ctx_for(), train, batch_size=2, history_dropout=1.0)
    assert [len(b.users) for b in batches] == [2, 1]
    for b in batches:
        assert b.features[HISTORY].values().numel() == 0
        indptr, targets = b.targets
        assert [targets[indptr[i] : indptr[i + 1]].tolist() for i in range(len(b.users))] == [ROWS[u] for u in b.users]


def test_user_id_and_demographics_dropout_replace_ids_with_oov_and_missing():
    s = spec(use_user_id=True, use_demographics=True)
    (kept,) = epoch(s, ctx_for(), to_csr(ROWS))
    users = kept.users.tolist()
    assert kept.features[USER_ID].values().tolist() == users
    assert kept.features[AGE].values().tolist() == [[1, 2, 3, 4][u] for u in users]
    assert kept.features[OCCUPATION].values().tolist() == [[2, 1, 0, 3][u] for u in users]
    (dropped,) = epoch(s, ctx_for(), to_csr(ROWS), user_id_dropout=1.0, demographics_dropout=1.0)
    assert dropped.features[USER_ID].values().tolist() == [4, 4, 4]  # the OOV row, n_users
    for key in (AGE, GENDER, OCCUPATION):
        assert dropped.features[key].values().tolist() == [0, 0, 0]  # row 0: missing


@pytest.mark.parametrize("rating_weighted", [False, True])
def test_same_draws_give_the_numpy_paths_batches(rating_weighted):
    """For one hide mask and user order, every batch equals what epoch_batches builds on the host
    (user_features over the kept entries; targets = the hidden entries), ratings included."""
    rng = np.random.default_rng(3)
    rows = [sorted(rng.choice(30, size=int(rng.integers(0, 9)), replace=False).tolist()) for _ in range(40)]
    train = (*to_csr(rows), rng.integers(1, 6, size=sum(map(len, rows))).astype(np.float32))
    hide = rng.random(len(train[1])) < 0.4
    users = rng.permutation(np.flatnonzero(np.diff(train[0]) > 0))
    s, ctx = TowerSpec(n_users=40, n_items=30, n_genres=1, use_user_id=True, use_demographics=True, n_gender=2, n_occupation=4), ctx_for(rating_weighted)
    ctx = Context(UserSide(*(np.resize(a, 40) for a in (ctx.users.age, ctx.users.gender, ctx.users.occupation)), to_csr([[]] * 40), to_csr([[]] * 40), ["f"], ["a", "b", "c"]), None, rating_weighted)
    gen = torch.Generator().manual_seed(0)
    got = list(_device_batches(s, ctx, train, 16, 0.0, gen, CPU, 0.0, torch.from_numpy(hide), torch.from_numpy(users)))
    history, targets = csr_from_mask(train, ~hide), csr_from_mask(train, hide)
    assert [len(b.users) for b in got] == [16, 16, len(users) - 32]
    for i, b in enumerate(got):
        batch = users[16 * i : 16 * (i + 1)]
        assert b.users.tolist() == batch.tolist()
        want = user_features(s, ctx, batch, history, CPU)
        assert b.features.keys() == want.keys()
        assert torch.equal(b.features.values(), want.values()) and torch.equal(b.features.lengths(), want.lengths())
        torch.testing.assert_close(b.features.weights(), want.weights(), rtol=1e-6, atol=1e-7)
        t_len, t_val = gather_rows(targets, batch)
        assert b.targets[0].tolist() == [0, *np.cumsum(t_len).tolist()] and b.targets[1].tolist() == t_val.tolist()


def test_stated_genres_refuse_device_batches_naming_the_key(tmp_path):
    cfg, data, ctx, model, task = setup(tmp_path, ["model.use_stated=true", "trainer.device_batches=true"])
    with pytest.raises(ValueError, match="trainer.device_batches"):
        Trainer(model, task, cfg.trainer, 0.3, 0.0, CPU)


def setup(tmp_path, extra=()):
    cfg = load_config(REPO / "configs" / "two_tower.yaml", [
        "data.synthetic.n_users=200", "data.synthetic.n_items=120", "trainer.epochs=3", "trainer.batch_size=32", "trainer.progress=false",
        "tracking.enabled=false", f"trainer.checkpoint_dir={tmp_path}/ckpt", *extra])  # fmt: skip
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    seed_everything(0)
    model = build_model(cfg, data.dataset, ctx, CPU)
    return cfg, data, ctx, model, RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))


def fit(tmp_path, extra=()):
    cfg, data, ctx, model, task = setup(tmp_path, extra)
    trainer = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, cfg.model.user_id_dropout, CPU)
    return trainer, trainer.fit(data.train, None, None, ctx)


def test_device_batches_train_reproducibly(tmp_path):
    a = fit(tmp_path / "a", ["trainer.device_batches=true"])[1].history
    b = fit(tmp_path / "b", ["trainer.device_batches=true"])[1].history
    plain = fit(tmp_path / "c")[1].history
    assert a == b  # seeded from the numpy generator: the same run twice
    assert a[-1]["train/loss"] < a[0]["train/loss"]
    # other draws, the same objective: the numpy path's losses within a few percent
    for x, y in zip(a, plain):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=0.05)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead's CUDA graphs: none on the CPU
def test_compile_trains_to_the_eager_loss_trajectory_and_leaves_the_model_eager(tmp_path, mode):
    trainer, compiled = fit(tmp_path / "a", ["trainer.compile=true", f"trainer.compile_mode={mode}"])
    eager = fit(tmp_path / "b")[1]
    for x, y in zip(compiled.history, eager.history):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4)
    assert trainer.model.user_arch.mlp._compiled_call_impl is None  # export traces the eager towers


def test_steps_per_epoch_caps_the_steps(tmp_path):
    trainer, result = fit(tmp_path, ["trainer.steps_per_epoch=2"])
    # 3 epochs x 2 steps of Adam (the catalog's item tower is in every step)
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {6}
    assert result.epochs_run == 3
