"""benchmarks/dp_scaling.py on the synthetic data: s = 1 is the product's own DP-EASE release scored on
validation (same σ, λ, prior, noise draw), the no-noise ceiling is the best of its λ grid, and the JSON
carries one row per (ε, s) with the members it stands for."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_script

scaling = load_script("benchmarks/dp_scaling.py")


def test_scale_one_is_the_product_release_and_the_rows_are_complete(tmp_path):
    from training.config import load_config
    from training.pipeline import prepare
    from training.privacy import gram

    out = tmp_path / "s.json"
    assert scaling.main(["--data", "synthetic", "--epsilons", "4", "--scales", "1,3", "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["scale"]: r for r in report["rows"]}
    assert set(rows) == {1, 3} and rows[3]["members"] == 3 * report["members"]
    cfg = load_config(scaling.harness.CONFIGS / "ease_dp.yaml", ["tracking.enabled=false", "store.load=false", "privacy.ledger=false", "privacy.audit_seed=0"])
    data = prepare(cfg)
    n, m = data.dataset.n_items, report["members"]
    users = np.flatnonzero(np.diff(data.val[0]) > 0)
    sigma = gram.gaussian_sigma(4.0, 1.0 / m)
    model = gram.release(data.train, n, sigma, gram.release_lambda(sigma, n, m), None, np.random.default_rng(0), gram.prior_weight(sigma, n, m))
    from training import evaluation

    want = evaluation.ranking_metrics(model.topk(data.train, users, 10), data.val[:2], users, 10, n)["ndcg@10"]
    assert rows[1]["val_ndcg"] == pytest.approx(want, abs=1e-9)
    ceiling = max(scaling.val_ndcg(gram.gram_statistic(data.train, n), lam, False, data, users, 10) for lam in scaling.CEILING_LAMBDAS)
    assert report["no_noise_val_ndcg"] == pytest.approx(ceiling) and rows[1]["ratio_to_no_noise"] == pytest.approx(want / ceiling)


def test_bad_flags_are_refused_by_name(capsys):
    for argv in (["--epsilons", "inf"], ["--scales", "0"], ["--seeds", ""]):
        with pytest.raises(SystemExit) as e:
            scaling.main(["--data", "synthetic", *argv])
        assert e.value.code == 2
    assert "--epsilons / --scales / --seeds" in capsys.readouterr().err
