"""User-level DP-SGD (real Opacus): the DP twin computes what TwoTower computes, its per-sample
gradients are the per-user gradients, epsilon is Opacus' accountant's, more noise costs more
loss, and a DP run records its guarantee in the manifest and in MLflow."""
from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow import MlflowClient
from opacus.accountants import RDPAccountant

from tests.conftest import REPO, tiny_overrides
from tests.training.dp_grads import assert_per_sample_gradients_are_per_user
from training.config import ConfigError, load_config
from training.data import item_features, user_feed, user_features
from training.export import write_artifacts
from training.pipeline import build_model, context, item_counts, prepare, train
from training.privacy.dp import DPTwoTower, fit_dp, per_user_loss, user_batch
from training.privacy.holdout import holdout_mask, without_users
from training.task import RetrievalTask
from training.tracking import Tracker
from training.trainer import seed_everything

CPU = torch.device("cpu")
SMALL = ["data.synthetic.n_users=120", "data.synthetic.n_items=60", "model.embedding_dim=8", "model.hidden_dim=16", "model.output_dim=8"]
HYBRID = ["model.use_content=true", "model.use_demographics=true", "model.use_stated=true", "model.rating_weighted=true", "model.title_buckets=32"]


def setup(tmp_path, extra=()):
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + SMALL + list(extra))
    seed_everything(0)
    data = prepare(cfg)
    ds = data.dataset
    ctx = context(cfg, ds)
    model = build_model(cfg, ds, ctx, CPU)
    task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items))
    return cfg, data, ctx, model, task


@pytest.mark.parametrize("extra", [[], ["model.item_bias=true"]], ids=["plain", "item_bias"])
def test_dp_twin_computes_what_the_torchrec_towers_compute(tmp_path, extra):
    cfg, data, ctx, model, _ = setup(tmp_path, HYBRID + extra)
    dp = DPTwoTower(model)
    users = np.arange(20)
    kjt = user_features(model.spec, ctx, users, data.train, CPU)
    with torch.no_grad():
        expected_user = model.user_arch(kjt)
        got_user = dp.user_arch(dp.user_bags(kjt))
        expected_items = model.item_arch(item_features(model.spec, ctx, CPU))
        got_items = dp.item_arch(dp.item_arch.pools(item_features(model.spec, ctx, CPU)), torch.zeros(2, 1))
    assert set(dp.user_arch.feature_names) == {"history", "age", "gender", "occupation", "liked", "avoided"}
    assert set(dp.item_arch.feature_names) == {"item_id", "genres", "year", "title"}
    torch.testing.assert_close(got_user, expected_user, atol=1e-6, rtol=1e-5)
    assert got_items.shape == (2, model.spec.n_items, model.spec.vector_dim)  # one copy per user
    torch.testing.assert_close(got_items[1], expected_items, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("extra", [[], ["model.item_bias=true"]], ids=["plain", "item_bias"])
def test_per_sample_gradients_equal_per_user_autograd(tmp_path, extra):
    cfg, data, ctx, model, _ = setup(tmp_path, HYBRID + extra)
    torch.manual_seed(1)
    with torch.no_grad():  # away from the init, so every parameter gets a non-trivial gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dp, bags = assert_per_sample_gradients_are_per_user(cfg, model, ctx, data.train, CPU)
    # the history table's gradient really is per user: rows of items outside the user's bag stay 0
    hist = dict(dp.named_parameters())["user_arch.tables.history.weight"].grad_sample
    seen = set(bags[0][0][0][bags[0][1][0] > 0].tolist())
    untouched = [r for r in range(hist.shape[1]) if r not in seen]
    assert torch.count_nonzero(hist[0, untouched]) == 0 and torch.count_nonzero(hist[0]) > 0


@pytest.mark.parametrize("extra", [[], ["model.item_bias=true"]], ids=["plain", "item_bias"])
def test_exported_onnx_equals_the_dp_user_tower(tmp_path, extra):
    cfg, data, ctx, model, task = setup(tmp_path, HYBRID + extra)
    dp = DPTwoTower(model)
    opt = torch.optim.Adam(dp.parameters(), lr=0.05)
    rng = np.random.default_rng(0)
    for _ in range(3):  # move the DP twin's weights away from the TwoTower's
        batch = user_batch(cfg, model, ctx, data.train, np.arange(40), rng, CPU)
        opt.zero_grad()
        per_user_loss(dp(dp.user_bags(batch.features), dp.item_arch.pools(item_features(model.spec, ctx, CPU))), batch.targets).mean().backward()
        opt.step()
    dp.copy_to(model)
    item_vec = task.item_embeddings(model, ctx, CPU).numpy()
    write_artifacts(model, ctx, item_vec, data.dataset, data.seen, tmp_path / "bundle", {}, {}, [], 1e-5)
    users = np.arange(30)
    session = ort.InferenceSession(str(tmp_path / "bundle" / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, user_feed(model.spec, ctx, users, data.seen))[0]
    with torch.no_grad():
        dp_out = dp.user_arch(dp.user_bags(user_features(model.spec, ctx, users, data.seen, CPU))).numpy()
        dp_items = dp.item_arch(dp.item_arch.pools(item_features(model.spec, ctx, CPU, oov=task.cold)), torch.zeros(1, 1))[0].numpy()
    np.testing.assert_allclose(onnx_out, dp_out, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "bundle" / "item_embeddings.npy"), dp_items, atol=1e-5)


def _fit(tmp_path, extra):
    cfg, data, ctx, model, task = setup(tmp_path, ["privacy.mode=dp", "trainer.epochs=4", "trainer.batch_size=32", "privacy.target_epsilon=null", *extra])
    return fit_dp(cfg, model, task, data, ctx, CPU, Tracker(False, "", ""))


def test_item_bias_is_one_more_coordinate_by_hand(tmp_path):
    cfg, data, ctx, model, _ = setup(tmp_path, ["model.item_bias=true", "model.hidden_layers=0"])
    n, d = model.spec.n_items, model.spec.output_dim
    with torch.no_grad():
        model.item_arch.bias.copy_(torch.arange(n + 1, dtype=torch.float32).unsqueeze(1) / 10)  # item i: b = i / 10
    users, items = user_features(model.spec, ctx, np.arange(3), data.train, CPU), item_features(model.spec, ctx, CPU)
    oov = item_features(model.spec, ctx, CPU, oov=np.ones(n, bool))
    with torch.no_grad():
        u, v, logits = model.user_arch(users), model.item_arch(items), model(users, items)
        v_oov = model.item_arch(oov)
    assert u.shape == (3, d + 1) and v.shape == (n, d + 1) and model.spec.vector_dim == d + 1
    assert torch.equal(u[:, d], torch.ones(3)) and torch.allclose(u[:, :d].norm(dim=1), torch.ones(3))  # unit cosine part, then 1
    torch.testing.assert_close(v[:, d], torch.arange(n, dtype=torch.float32) / 10)  # the item's own bias
    torch.testing.assert_close(v_oov[:, d], torch.full((n,), n / 10))  # OOV items: the OOV row's bias
    # logit(user, item 2) = (cos + 0.2) / T; item 2 vs item 1 with equal cosines: +0.1 / T apart
    cos = u[:, :d] @ v[:, :d].T
    torch.testing.assert_close(logits, (cos + torch.arange(n) / 10) / model.spec.temperature)
    torch.testing.assert_close(logits[:, 2] - logits[:, 1], (cos[:, 2] - cos[:, 1] + 0.1) / model.spec.temperature)
    assert cfg.model.item_bias and not load_config(None, []).model.item_bias  # off by default


def test_dp_follows_the_cosine_lr_schedule(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    fit = _fit(tmp_path, ["privacy.noise_multiplier=1.0", "trainer.lr=0.1", "trainer.lr_schedule=cosine", "trainer.batch_size=1000"])
    # sample rate 1: one step per epoch; cosine over 4 epochs: lr * (1 + cos(pi (e - 1) / 4)) / 2
    assert fit.privacy["steps"] == 4
    assert seen == pytest.approx([0.1, 0.1 * (1 + math.sqrt(0.5)) / 2, 0.05, 0.1 * (1 - math.sqrt(0.5)) / 2])


def test_more_noise_gives_higher_loss_on_a_fixed_seed(tmp_path):
    quiet = _fit(tmp_path, ["privacy.noise_multiplier=0.3"])
    again = _fit(tmp_path, ["privacy.noise_multiplier=0.3"])
    noisy = _fit(tmp_path, ["privacy.noise_multiplier=30"])
    assert [h["train/loss"] for h in quiet.history] == [h["train/loss"] for h in again.history]  # same seed, same run
    assert noisy.history[-1]["train/loss"] > quiet.history[-1]["train/loss"] + 0.05
    assert quiet.privacy["noise_multiplier"] == 0.3 and noisy.privacy["noise_multiplier"] == 30
    assert noisy.privacy["epsilon"] < quiet.privacy["epsilon"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_run")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + SMALL + [
        "privacy.mode=dp", "privacy.target_epsilon=2", "privacy.audit_holdout=0.25", "trainer.epochs=3",
        "trainer.batch_size=1000",  # >= the training users: sample rate 1, so epsilon has a closed form below
        "tracking.register_model=false",
    ])  # fmt: skip
    return cfg, train(cfg)


def test_dp_run_records_its_guarantee_in_manifest_and_mlflow(dp_run):
    cfg, result = dp_run
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    privacy = manifest["provenance"]["privacy"]
    n = round(cfg.data.synthetic.n_users * 0.75)  # members: the audit holdout took a quarter
    assert privacy["mode"] == "dp" and privacy["unit"] == "user" and privacy["accountant"] == "rdp"
    assert privacy["training_users"] == n and privacy["delta"] == pytest.approx(1 / n)
    assert privacy["sample_rate"] == 1.0 and privacy["steps"] == 3 and privacy["max_grad_norm"] == 1.0
    assert privacy["epsilon"] <= 2.0 + 0.01  # Opacus' tolerance on the noise-multiplier search
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["privacy/epsilon"] == pytest.approx(privacy["epsilon"])
    assert run.data.metrics["privacy/noise_multiplier"] == pytest.approx(privacy["noise_multiplier"])
    assert run.data.metrics["privacy/steps"] == 3 and run.data.metrics["privacy/sample_rate"] == 1.0
    assert run.data.tags["privacy.mode"] == "dp" and run.data.tags["privacy.accountant"] == "rdp"


def test_dp_bundle_fallback_list_comes_from_the_model_not_raw_counts(dp_run):
    """Counting interactions would release raw data outside the accountant: the bundle's
    popularity list is the DP model's own ranking for a user it knows nothing about, recomputed
    here through the exported ONNX tower as serving runs it."""
    from serving.recommender import Recommender, UserState

    cfg, result = dp_run
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    rec = Recommender.from_dir(result.artifact_dir)
    empty = UserState(np.zeros(0, np.int64), np.zeros(0, np.float32), None)
    scores = rec.item_vectors @ rec.user_vectors([empty], [rec.user_oov])[0]
    want = [rec.item_vocab.ids[i] for i in np.argsort(-scores, kind="stable")[: len(manifest["popularity"])]]
    assert manifest["popularity"] == want
    assert len(want) == min(cfg.export.popularity_top_n, len(rec.items))


def test_epsilon_is_opacus_accountant_and_the_closed_form(dp_run):
    _, result = dp_run
    p = result.fit.privacy
    acc = RDPAccountant()
    acc.history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(p["delta"]), rel=1e-12)
    # sample rate 1: T Gaussian mechanisms, RDP(alpha) = T alpha / (2 sigma^2); Balle et al. 2020 conversion
    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), float)
    rdp = p["steps"] * alphas / (2 * p["noise_multiplier"] ** 2)
    eps = rdp - (math.log(p["delta"]) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert p["epsilon"] == pytest.approx(eps.min(), rel=1e-9)


def test_dp_refuses_user_id_embeddings_and_sampled_softmax(tmp_path):
    cases = ((["model.use_user_id=true"], "model.use_user_id"), (["task.loss=sampled_softmax"], "task.loss"), (["task.loss_weighting=item"], "task.loss_weighting"))
    for extra, key in cases:
        cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.mode=dp", "tracking.enabled=false", *extra])
        with pytest.raises(ConfigError, match=key):
            train(cfg)


def test_config_wants_one_noise_setting(tmp_path):
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        load_config(None, ["privacy.mode=dp", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        load_config(None, ["privacy.mode=dp", "privacy.target_epsilon=null"])
    assert load_config(None, ["privacy.mode=dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]).privacy.noise_multiplier == 1.0


def test_audit_holdout_keeps_users_out_of_every_split_part(tmp_path):
    mask = holdout_mask(10, 0.3, seed=0)
    assert mask.sum() == 3 and np.array_equal(mask, holdout_mask(10, 0.3, seed=0))
    assert not np.array_equal(mask, holdout_mask(10, 0.3, seed=1))
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.audit_holdout=0.25"])
    data = prepare(cfg)
    held = np.flatnonzero(holdout_mask(120, 0.25, 0))
    assert len(held) == 30
    for part in (data.split.train, data.split.val, data.split.test):
        assert not np.isin(part.user, held).any()
    kept = without_users(prepare(load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + SMALL)).split, holdout_mask(120, 0.25, 0))
    assert len(kept.train) == len(data.split.train) and len(kept.test) == len(data.split.test)


def test_empty_poisson_batches_still_take_a_noise_only_step(tmp_path):
    # 1 expected user per step out of ~40: about a third of the Poisson batches are empty
    cfg, data, ctx, model, task = setup(tmp_path, ["data.synthetic.n_users=40", "privacy.mode=dp", "trainer.epochs=1", "trainer.batch_size=1", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_dp(cfg, model, task, data, ctx, CPU, Tracker(False, "", ""))
    n = int((np.diff(data.train[0]) > 0).sum())
    assert fit.privacy["steps"] == n and fit.privacy["sample_rate"] == pytest.approx(1 / n)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())
