"""The membership-inference audit: hand-checked statistics, chance on a model that never saw the
data, detection on a model that memorized its users, and `trustrec audit privacy` on real runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import REPO, tiny_overrides
from cli.main import main
from training.config import load_config
from training.export import write_artifacts
from training.pipeline import build_model, context, item_counts, prepare, train
from training.privacy.audit import audit_bundle, bootstrap_ci, roc_auc, roc_curve, tpr_at_fpr
from training.task import RetrievalTask
from training.trainer import seed_everything

CPU = torch.device("cpu")
SMALL = ["data.synthetic.n_users=200", "data.synthetic.n_items=100", "trainer.progress=false"]


def test_auc_counts_pairs_with_ties_as_half():
    # pairs (member, non-member): 3>0 3>2 | 2>0 2=2 | 1>0 1<2  ->  (2 + 1.5 + 1) / 6
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([0.0, 2.0])) == pytest.approx(4.5 / 6)
    assert roc_auc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([5.0, 6.0])) == 0.0
    with pytest.raises(ValueError, match="non-members"):
        roc_auc(np.array([1.0]), np.array([]))


def test_roc_curve_and_tpr_at_low_fpr_by_hand():
    fpr, tpr = roc_curve(np.array([3.0, 2.0, 1.0]), np.array([0.0, 2.0]))
    # thresholds >=3: (0, 1/3); >=2 (tie of a member and a non-member): (1/2, 2/3); >=1: (1/2, 1); >=0: (1, 1)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(1 / 3)
    assert np.trapezoid(tpr, fpr) == pytest.approx(4.5 / 6)  # the area under the curve is the AUC


def test_bootstrap_interval_brackets_the_auc_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    small = rng.normal(0.5, 1, 50), rng.normal(0, 1, 50)
    large = rng.normal(0.5, 1, 2000), rng.normal(0, 1, 2000)
    lo_s, hi_s = bootstrap_ci(*small, n_boot=300)
    lo_l, hi_l = bootstrap_ci(*large, n_boot=300)
    assert lo_s < roc_auc(*small) < hi_s and lo_l < roc_auc(*large) < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 40x the users, ~6x narrower
    assert bootstrap_ci(*small, n_boot=300, seed=3) == bootstrap_ci(*small, n_boot=300, seed=3)


def _bundle_of(cfg, model, data, ctx, out):
    task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))
    item_vec = task.item_embeddings(model, ctx, CPU).numpy()
    write_artifacts(model, ctx, item_vec, data.dataset, data.seen, out, {}, {"privacy": {"mode": "none"}}, [], 1e-5)
    return out


def test_audit_is_at_chance_on_a_model_that_never_saw_the_data(tmp_path):
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + ["privacy.audit_holdout=0.5"])
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    seed_everything(0)
    model = build_model(cfg, data.dataset, ctx, CPU)  # untrained: members and non-members are alike to it
    audit = audit_bundle(_bundle_of(cfg, model, data, ctx, tmp_path / "bundle"), cfg, n_boot=300)
    assert audit.n_members + audit.n_non_members == 1000 and audit.n_non_members == 500
    for r in audit.results.values():
        assert r.ci_low < 0.5 < r.ci_high, r
        assert abs(r.auc - 0.5) < 0.05, r


@pytest.fixture(scope="module")
def memorizing_run(tmp_path_factory):
    """Non-private, trained far past early stopping on few users: it memorizes them."""
    root = tmp_path_factory.mktemp("memorizing")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + SMALL + [
        "privacy.audit_holdout=0.5", "trainer.epochs=60", "trainer.patience=60", "trainer.lr=0.01", "tracking.register_model=false",
    ])  # fmt: skip
    return cfg, train(cfg)


def test_audit_detects_a_model_that_memorized_its_users(memorizing_run):
    cfg, result = memorizing_run
    audit = audit_bundle(result.artifact_dir, cfg, n_boot=300)
    assert audit.n_non_members == 100
    assert audit.results["calibrated"].ci_low > 0.55, audit.results


def test_cli_audit_privacy_logs_auc_and_roc_to_the_run(memorizing_run, tmp_path, capsys):
    cfg, result = memorizing_run
    rc = main(["audit", "privacy", result.run_id, "--tracking-uri", cfg.tracking.tracking_uri, "--out", str(tmp_path), "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert rc == 0 and "calibrated" in out and "AUC" in out
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["n_members"] == 100 and summary["privacy"] == {"mode": "none"}
    client = MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    for attack in ("loss", "calibrated"):
        low, auc, high = (metrics[f"audit/{attack}/{k}"] for k in ("auc_ci_low", "auc", "auc_ci_high"))
        assert low <= auc <= high
        assert auc == pytest.approx(summary["attacks"][attack]["auc"])
    assert {f.path for f in client.list_artifacts(result.run_id, "audit")} == {"audit/roc.png", "audit/audit.json"}
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_audit_refuses_a_run_without_held_out_users(trained_run, capsys):
    rc = main(["audit", "privacy", trained_run.result.run_id, "--tracking-uri", trained_run.tracking_uri, "--out", str(trained_run.root / "audit")])
    assert rc == 2
    assert "privacy.audit_holdout" in capsys.readouterr().err
