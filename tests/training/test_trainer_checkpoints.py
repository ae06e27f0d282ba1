"""Trainer: device choice, a checkpoint per epoch, exact resume (RNG restore), early stopping."""
from __future__ import annotations

import inspect
import logging
from dataclasses import asdict

import numpy as np
import pytest
import torch

from training.config import TrainerConfig, load_config
from training.pipeline import build_model, context, item_counts, prepare
from training.task import RetrievalTask
from training.trainer import EarlyStopping, Trainer, pick_device

CPU = torch.device("cpu")
DATA = ["data.synthetic.n_users=80", "data.synthetic.n_items=60", "data.synthetic.n_genres=4", "data.synthetic.mean_interactions_per_user=10"]
MODEL = ["model.embedding_dim=16", "model.hidden_dim=24", "model.output_dim=16", "model.use_user_id=true", "model.user_id_dropout=0.2"]
HYBRID = ["model.kind=hybrid", "model.use_content=true", "model.use_demographics=true", "model.use_stated=true", "model.rating_weighted=true",
          "model.item_id_dropout=0.2", "model.demographics_dropout=0.3", "model.stated_dropout=0.5", "model.title_buckets=32"]  # fmt: skip


def _prepare(overrides):
    cfg = load_config(None, overrides)
    data = prepare(cfg)
    return cfg, data, context(cfg, data.dataset)


@pytest.fixture(scope="module")
def prepared():
    return _prepare(DATA + MODEL)


@pytest.fixture(scope="module")
def prepared_hybrid():
    """Every side feature on, with item-id, demographics and stated-genre dropout (more RNG to restore)."""
    return _prepare(DATA + MODEL + HYBRID)


def make_trainer(prepared, ckpt_dir, init_seed=0, loss="full_softmax", on_epoch=None, **trainer):
    cfg, data, ctx = prepared
    torch.manual_seed(init_seed)
    model = build_model(cfg, data.dataset, ctx, CPU)
    task = RetrievalTask(cfg.task.model_copy(update={"loss": loss}), item_counts(data.train, data.dataset.n_items), cfg.model.item_id_dropout)
    tcfg = TrainerConfig(**{"batch_size": 32, "lr": 0.01, "seed": 3, "patience": 50, "progress": False, "checkpoint_dir": str(ckpt_dir), **trainer})
    m = cfg.model
    return Trainer(model, task, tcfg, cfg.task.history_dropout, m.user_id_dropout, CPU, m.demographics_dropout, m.stated_dropout, on_epoch=on_epoch)


def fit(trainer, prepared, resume=False):
    _, data, ctx = prepared
    return trainer.fit(data.train, data.train, data.val, ctx, resume=resume)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- device ------------------------------------------------------------------------------------
def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="trainer.device=cuda"):
        pick_device("cuda")


def test_pick_device_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stands in for a GPU
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="host has CUDA")
def test_pick_device_real_host_is_cpu():
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError):
        pick_device("cuda")


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_per_epoch_with_model_optimizer_rng(prepared, tmp_path):
    seen = []
    trainer = make_trainer(prepared, tmp_path / "ck", epochs=3, on_epoch=lambda e, m: seen.append((e, dict(m))))
    result = fit(trainer, prepared)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]  # no temp files
    assert trainer.latest_checkpoint().name == "epoch-003.pt"
    assert [e for e, _ in seen] == [1, 2, 3]
    assert {"train/loss", "val/ndcg@10", "val/recall@10"} <= set(seen[0][1])
    assert result.epochs_run == 3 and len(result.history) == 3

    for epoch in (1, 3):
        payload = torch.load(tmp_path / "ck" / f"epoch-{epoch:03d}.pt", weights_only=False)
        assert {"epoch", "model", "optimizer", "rng", "best_metric", "best_epoch", "bad_epochs", "best_state", "history", "spec"} <= set(payload)
        assert payload["epoch"] == epoch
        assert set(payload["rng"]) == {"numpy_generator", "numpy_global", "python", "torch", "cuda"}
        assert payload["optimizer"]["param_groups"][0]["lr"] == 0.01
        assert len(payload["optimizer"]["state"]) == len(list(trainer.model.parameters()))  # Adam moments for every tensor
        assert [h["epoch"] for h in payload["history"]] == list(range(1, epoch + 1))
        assert payload["spec"] == asdict(trainer.model.spec)
        assert set(payload["model"]) == set(trainer.model.state_dict())

    # the trainer ends on the best weights, which the last checkpoint also carries
    last = torch.load(tmp_path / "ck" / "epoch-003.pt", weights_only=False)
    ndcg = [h["val/ndcg@10"] for h in result.history]
    assert result.best_metric == max(ndcg) == last["best_metric"]
    assert result.best_epoch == 1 + int(np.argmax(ndcg)) == last["best_epoch"]
    assert_same_state(trainer.model.state_dict(), last["best_state"])
    # ... while payload["model"] is the last epoch's weights (training moved them)
    assert any(not torch.equal(last["model"][k], last["best_state"][k]) for k in last["model"]) or result.best_epoch == 3
    first = torch.load(tmp_path / "ck" / "epoch-001.pt", weights_only=False)
    assert any(not torch.equal(first["model"][k], last["model"][k]) for k in first["model"])


@pytest.mark.parametrize("loss, model", [("full_softmax", "two_tower"), ("sampled_softmax", "two_tower"), ("full_softmax", "hybrid")])
def test_resume_reproduces_an_uninterrupted_run(request, tmp_path, loss, model):
    """4 epochs in one go == 2 epochs, then a fresh Trainer resumed to 4: same weights, same history.

    Only holds if the checkpoint restores the numpy Generator (masks, user-id / demographics /
    stated dropout) and the numpy global RNG (sampled positives, item-id dropout) as well as model
    and Adam state: fit() reseeds at its start."""
    prepared = request.getfixturevalue("prepared" if model == "two_tower" else "prepared_hybrid")
    straight = make_trainer(prepared, tmp_path / "a", epochs=4, loss=loss)
    a = fit(straight, prepared)

    fit(make_trainer(prepared, tmp_path / "b", epochs=2, loss=loss), prepared)
    assert sorted(p.name for p in (tmp_path / "b").iterdir())[-1] == "epoch-002.pt"
    resumed = make_trainer(prepared, tmp_path / "b", epochs=4, loss=loss, init_seed=123)  # other init: must be overwritten
    b = fit(resumed, prepared, resume=True)

    assert b.history == a.history
    assert (b.best_epoch, b.best_metric, b.epochs_run) == (a.best_epoch, a.best_metric, a.epochs_run) == (a.best_epoch, a.best_metric, 4)
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    ca = torch.load(tmp_path / "a" / "epoch-004.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "epoch-004.pt", weights_only=False)
    assert_same_state(cb["model"], ca["model"])
    for key, state in ca["optimizer"]["state"].items():
        assert_same_state(cb["optimizer"]["state"][key], state)


def test_resume_without_checkpoint_starts_from_scratch(prepared, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        result = fit(make_trainer(prepared, tmp_path / "empty", epochs=1), prepared, resume=True)
    assert "no checkpoint" in caplog.text
    assert result.epochs_run == 1 and [h["epoch"] for h in result.history] == [1]


def test_resume_from_a_checkpoint_without_optimizer_state(prepared, tmp_path, caplog):
    """A distributed run writes `"optimizer": None` (fused optimizers live in the sharded tables):
    the plain Trainer resumes its weights and epoch, with fresh Adam moments."""
    fit(make_trainer(prepared, tmp_path / "d", epochs=2), prepared)
    path = tmp_path / "d" / "epoch-002.pt"
    payload = torch.load(path, weights_only=False)
    payload["optimizer"] = None
    torch.save(payload, path)
    resumed = make_trainer(prepared, tmp_path / "d", epochs=3, init_seed=7)
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        result = fit(resumed, prepared, resume=True)
    assert "no optimizer state" in caplog.text
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.epochs_run == 3
    assert resumed.optimizer.state_dict()["state"]  # Adam ran epoch 3 from fresh moments


# -- early stopping ---------------------------------------------------------------------------------
def test_early_stopping_when_validation_cannot_improve(prepared, tmp_path):
    # lr = 1e-12: the weights do not move, so val NDCG stays at its epoch-1 value.
    # epoch 1 improves on -1 (best, bad = 0); epochs 2 and 3 tie (bad = 1, 2); patience 2 -> stop after 3
    trainer = make_trainer(prepared, tmp_path / "es", epochs=10, lr=1e-12, patience=2)
    result = fit(trainer, prepared)
    assert result.epochs_run == 3 < 10
    assert result.best_epoch == 1
    assert len(result.history) == 3
    assert len({h["val/ndcg@10"] for h in result.history}) == 1
    assert sorted(p.name for p in (tmp_path / "es").iterdir()) == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]
    assert torch.load(tmp_path / "es" / "epoch-003.pt", weights_only=False)["bad_epochs"] == 2

    # resuming a run that already stopped trains nothing more and reports the same epochs
    again = fit(make_trainer(prepared, tmp_path / "es", epochs=10, lr=1e-12, patience=2), prepared, resume=True)
    assert again.epochs_run == 3 and again.best_epoch == 1 and again.history == result.history
    assert trainer.latest_checkpoint().name == "epoch-003.pt"


def test_early_stopping_min_delta_counts_only_significant_gains():
    # min_delta 0.1 (10 %): a gain resets patience only above anchor * 1.1; any gain still becomes the best
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert es.update(0.30, 1) and (es.anchor, es.bad, es.best_epoch) == (0.30, 0, 1)  # the first value always counts
    assert es.update(0.32, 2) and (es.anchor, es.bad, es.best, es.best_epoch) == (0.30, 1, 0.32, 2)  # +6.7 %: kept, not significant
    assert es.stop_reason(0.0) is None
    assert es.update(0.34, 3) and (es.anchor, es.bad, es.best_epoch) == (0.34, 0, 3)  # 0.34 > 0.30 * 1.1 = 0.33: significant
    assert not es.update(0.33, 4) and (es.bad, es.best_epoch) == (1, 3)  # worse: nothing kept
    assert es.update(0.37, 5) and (es.anchor, es.bad) == (0.34, 2)  # 0.37 < 0.34 * 1.1 = 0.374: kept, not significant
    assert es.stop_reason(0.0) == "no gain above 10.0% for 2 epochs"
    assert es.state() == {"best_metric": 0.37, "best_epoch": 5, "bad_epochs": 2, "anchor": 0.34}


def test_early_stopping_without_min_delta_is_the_old_rule():
    # min_delta 0: every strict gain resets patience, ties and losses count against it
    es = EarlyStopping(patience=3)
    for epoch, value in enumerate([0.1, 0.1001, 0.1001, 0.1, 0.1002], start=1):
        es.update(value, epoch)
    assert (es.best, es.best_epoch, es.bad, es.anchor) == (0.1002, 5, 0, 0.1002)


def test_early_stopping_time_budget():
    es = EarlyStopping(patience=5, max_seconds=30.0)
    es.update(0.2, 1)
    assert es.stop_reason(29.9) is None
    assert es.stop_reason(30.0) == "time budget of 30 s spent (30 s)"
    assert EarlyStopping(patience=5).stop_reason(1e9) is None  # no budget


def test_min_delta_stops_a_fit_whose_gains_are_small(prepared, tmp_path):
    """Against the same run without it: the fit stops `patience` epochs after its last significant
    gain, keeps the best epoch of those it ran, and a checkpoint keeps the anchor for --resume."""
    full = fit(make_trainer(prepared, tmp_path / "a", epochs=12, patience=3), prepared)
    values = [h["val/ndcg@10"] for h in full.history]
    # replay the rule by hand on the same values (same seed, same epochs: identical until the stop)
    anchor, bad, stop_at = values[0], 0, None
    for epoch, v in enumerate(values[1:], start=2):
        anchor, bad = (v, 0) if v > anchor * 1.5 else (anchor, bad + 1)
        if bad >= 3:
            stop_at = epoch
            break
    assert stop_at is not None and stop_at < full.epochs_run, "with a 50 % margin the fit must stop before the plain rule does"
    short = fit(make_trainer(prepared, tmp_path / "b", epochs=12, patience=3, min_delta=0.5), prepared)
    assert short.epochs_run == stop_at
    assert [h["val/ndcg@10"] for h in short.history] == values[:stop_at]
    assert short.best_epoch == 1 + int(np.argmax(values[:stop_at]))
    payload = torch.load(tmp_path / "b" / f"epoch-{stop_at:03d}.pt", weights_only=False)
    assert payload["anchor"] == anchor and payload["bad_epochs"] == 3


def test_max_seconds_ends_the_fit_after_the_epoch_that_crosses_it(prepared, tmp_path):
    result = fit(make_trainer(prepared, tmp_path / "t", epochs=20, max_seconds=1e-6), prepared)
    assert result.epochs_run == 1 and result.best_epoch == 1


def test_trainer_hands_the_side_feature_dropouts_to_the_batches(prepared_hybrid, tmp_path, monkeypatch):
    import training.trainer as trainer_module

    calls = []
    real = trainer_module.epoch_batches

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "epoch_batches", spy)
    cfg, data, ctx = prepared_hybrid
    trainer = make_trainer(prepared_hybrid, tmp_path / "h", epochs=1)
    assert (trainer.demographics_dropout, trainer.stated_dropout, trainer.task.item_id_dropout) == (0.3, 0.5, 0.2)
    fit(trainer, prepared_hybrid)
    assert len(calls) == 1
    bound = inspect.signature(real).bind(*calls[0][0], **calls[0][1]).arguments
    assert bound["spec"].use_content and bound["spec"].use_demographics and bound["spec"].use_stated and bound["ctx"] is ctx
    assert (bound["batch_size"], bound["history_dropout"], bound["user_id_dropout"]) == (32, cfg.task.history_dropout, 0.2)
    assert (bound["demographics_dropout"], bound["stated_dropout"]) == (0.3, 0.5)


# -- learning-rate schedule and the refit without validation -------------------------------------------
def test_lr_at_constant_and_cosine_by_hand():
    from training.trainer import lr_at

    assert [lr_at(0.01, "constant", e, 4) for e in (1, 4)] == [0.01, 0.01]
    # cosine over 4 epochs: lr * (1 + cos(pi * (e - 1) / 4)) / 2 -> 1, (1 + 0.70711) / 2, 0.5, (1 - 0.70711) / 2
    got = [lr_at(0.01, "cosine", e, 4) for e in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, [0.01, 0.0085355339, 0.005, 0.0014644661], rtol=1e-8)


def test_cosine_schedule_sets_each_epochs_lr(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path / "cos", epochs=4, lr_schedule="cosine")
    fit(trainer, prepared)
    lrs = [torch.load(tmp_path / "cos" / f"epoch-{e:03d}.pt", weights_only=False)["optimizer"]["param_groups"][0]["lr"] for e in (1, 2, 3, 4)]
    np.testing.assert_allclose(lrs, [0.01, 0.0085355339, 0.005, 0.0014644661], rtol=1e-8)


def test_fit_without_validation_runs_exactly_the_epochs_and_keeps_the_last(prepared, tmp_path):
    """The refit stage: no val metrics, no early stopping (patience 1 would stop a validated run), last weights kept."""
    _, data, ctx = prepared
    seen = []
    trainer = make_trainer(prepared, tmp_path / "rf", epochs=50, patience=1, on_epoch=lambda e, m: seen.append(dict(m)))
    result = trainer.fit(data.seen, None, None, ctx, epochs=3)
    assert result.epochs_run == 3 == result.best_epoch and np.isnan(result.best_metric)
    assert [set(m) for m in seen] == [{"train/loss"}] * 3
    last = torch.load(tmp_path / "rf" / "epoch-003.pt", weights_only=False)
    assert last["best_state"] is None
    assert_same_state(trainer.model.state_dict(), last["model"])
    # resuming a finished refit trains nothing more and keeps the restored last weights
    again = make_trainer(prepared, tmp_path / "rf", epochs=50, patience=1, init_seed=9)
    out = again.fit(data.seen, None, None, ctx, resume=True, epochs=3)
    assert (out.epochs_run, out.best_epoch) == (3, 3) and len(out.history) == 3  # nothing ran now
    assert_same_state(again.model.state_dict(), last["model"])


def test_pipeline_refit_retrains_from_init_on_train_plus_val(prepared, tmp_path):
    """fit_model with trainer.refit: validation picks the epoch count, then the same initial weights
    are trained on seen (= train + val) for that many epochs; the result equals doing it by hand."""
    from training.pipeline import fit_model
    from training.tracking import Tracker

    cfg, data, ctx = prepared
    cfg = cfg.model_copy(update={"trainer": TrainerConfig(batch_size=32, lr=0.01, seed=3, epochs=4, patience=50, progress=False,
                                                          refit=True, checkpoint_dir=str(tmp_path / "p"))})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, data.dataset, ctx, CPU)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items), cfg.model.item_id_dropout)
    result = fit_model(cfg, model, task, data, ctx, CPU, Tracker(False, "", ""))
    assert len(result.history) == 4 and all("val/ndcg@10" in h for h in result.history)  # the selection run's
    n = result.best_epoch
    assert sorted(p.name for p in (tmp_path / "p" / "refit").iterdir()) == [f"epoch-{e:03d}.pt" for e in range(1, n + 1)]
    # the task now treats as cold only the items seen nowhere in train + val
    np.testing.assert_array_equal(task.cold, item_counts(data.seen, data.dataset.n_items) == 0)

    by_hand = build_model(cfg, data.dataset, ctx, CPU)
    by_hand.load_state_dict(init)
    task2 = RetrievalTask(cfg.task, item_counts(data.seen, data.dataset.n_items), cfg.model.item_id_dropout)
    m = cfg.model
    Trainer(by_hand, task2, cfg.trainer.model_copy(update={"checkpoint_dir": str(tmp_path / "hand")}), cfg.task.history_dropout,
            m.user_id_dropout, CPU, m.demographics_dropout, m.stated_dropout).fit(data.seen, None, None, ctx, epochs=n)  # fmt: skip
    assert_same_state(model.state_dict(), by_hand.state_dict())
