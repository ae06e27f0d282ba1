"""benchmarks/privacy.py: the rows (mean, population std, ratio to the best non-private model, the
audit's worse attack), the goals by hand, a real run on small synthetic data (product configs, the
audit on every bundle, --merge), and ML-1M implicit reported as skipped when its folder is absent."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_script

privacy = load_script("benchmarks/privacy.py")


def seed(s, ndcg, loss, calibrated, pop=0.2):
    return {"seed": s, "ndcg@10": ndcg, "popularity_ndcg@10": pop, "train_s": 1.0, "privacy": {"mode": "dp", "epsilon": 8.0, "ledger": {"x": 1}},
            "audit": {"loss": {"auc": loss}, "calibrated": {"auc": calibrated}}, "audit_statistic": "rank"}  # fmt: skip


def test_rows_by_hand():
    # ndcg 0.30, 0.33, 0.36: mean 0.33, pstdev sqrt((9 + 0 + 9)e-4 / 3) = 0.024495
    # audit: loss mean (0.50 + 0.52 + 0.54) / 3 = 0.52, calibrated mean (0.56 + 0.50 + 0.47) / 3 = 0.51 -> 0.52 (the worse attack)
    # popularity: each seed held out its own users, so its own popularity list: mean (0.2 + 0.21 + 0.22) / 3 = 0.21
    row = privacy.summarize("ease_dp", 8.0, "configs/x.yaml", [seed(0, 0.30, 0.50, 0.56), seed(1, 0.33, 0.52, 0.50, 0.21), seed(2, 0.36, 0.54, 0.47, 0.22)])
    assert row["ndcg@10"] == pytest.approx(0.33) and row["ndcg@10_std"] == pytest.approx(0.0244949, abs=1e-7)
    assert row["audit_auc"] == pytest.approx(0.52) and row["audit_statistic"] == "rank"
    assert row["popularity_ndcg@10"] == pytest.approx(0.21) and row["seeds"] == [0, 1, 2]
    assert row["privacy"] == {"mode": "dp", "epsilon": 8.0}  # nested blocks (the ledger) left out
    ref_a = privacy.summarize("trustrec-two-tower", math.inf, "a", [seed(0, 0.40, 0.6, 0.6)])
    ref_b = privacy.summarize("trustrec-hybrid", math.inf, "b", [seed(0, 0.44, 0.6, 0.6)])
    one = privacy.summarize("ease_dp", 1.0, "c", [seed(0, 0.19, 0.5, 0.5)])
    rows = [ref_a, ref_b, row, one]
    assert privacy.ratios(rows) == {"model": "trustrec-hybrid", "ndcg@10": 0.44}  # the best reference
    assert row["ratio_to_non_private"] == pytest.approx(0.33 / 0.44) and ref_a["ratio_to_non_private"] == pytest.approx(0.40 / 0.44)
    goals = privacy.goals(rows)
    assert goals["ease_dp_eps_8_ratio"] == {"goal": 0.9, "value": 0.75, "met": False}  # 0.33 / 0.44 = 0.75
    assert goals["ease_dp_eps_1_ratio"] == {"goal": 0.7, "value": round(0.19 / 0.44, 4), "met": False}
    assert goals["ease_dp_eps_8_above_popularity"]["met"] and not goals["ease_dp_eps_1_above_popularity"]["met"]  # 0.19 < 0.2
    assert goals["ease_dp_eps_8_audit_auc"] == {"goal": 0.55, "value": 0.52, "met": True}
    assert not any(k.startswith("trustrec-") for k in goals)  # the references have no goal
    assert privacy.ratios([row]) is None and row["ratio_to_non_private"] is None


def test_a_real_run_writes_the_rows_and_merges(tmp_path, capsys):
    small = ["--set", "data.synthetic.n_users=150", "--set", "data.synthetic.n_items=80", "--set", "trainer.epochs=1", "--bootstrap", "50"]
    first = tmp_path / "a.json"
    assert privacy.main(["--data", "synthetic", "--epsilons", "inf,2", "--models", "ease_dp", "--references", "trustrec-two-tower", "--seeds", "0,1", "--out", str(first), *small]) == 0
    report = json.loads(first.read_text())
    ref, ease = report["rows"]
    assert (ref["model"], ref["epsilon"], ease["model"], ease["epsilon"]) == ("trustrec-two-tower", math.inf, "ease_dp", 2.0)
    for row in report["rows"]:
        assert {"model", "epsilon", "ndcg@10", "ndcg@10_std", "ratio_to_non_private", "popularity_ndcg@10", "audit_auc"} <= set(row)
        assert row["ndcg@10"] == pytest.approx(sum(s["ndcg@10"] for s in row["per_seed"]) / 2)
        assert 0 <= row["audit_auc"] <= 1
    assert ease["ratio_to_non_private"] == pytest.approx(ease["ndcg@10"] / ref["ndcg@10"])
    assert ease["privacy"]["mechanism"].startswith("gaussian gram release") and ease["privacy"]["epsilon"] == pytest.approx(2.0)
    assert ease["audit_statistic"] == "rank" and ref["audit_statistic"] == "softmax"
    s0, s1 = ease["per_seed"]
    assert s0["ndcg@10"] != s1["ndcg@10"]  # the seed is the noise seed: two releases
    # each seed draws its own non-members (audit_seed = seed): other training users, so another popularity list
    assert report["audit_split"] == "per-seed" and s0["popularity_ndcg@10"] != s1["popularity_ndcg@10"]
    fixed = tmp_path / "fixed.json"
    assert privacy.main(["--data", "synthetic", "--epsilons", "2", "--models", "ease_dp", "--references", "none", "--seeds", "0,1", "--audit-split", "fixed",
                         "--no-audit", "--out", str(fixed), *small]) == 0  # fmt: skip
    f0, f1 = json.loads(fixed.read_text())["rows"][0]["per_seed"]
    assert f0["popularity_ndcg@10"] == f1["popularity_ndcg@10"] and f0["popularity_ndcg@10"] in (s0["popularity_ndcg@10"], s1["popularity_ndcg@10"])
    # --merge only: the rows come back with the same ratio, and a mismatched holdout is refused
    both = tmp_path / "b.json"
    assert privacy.main(["--data", "synthetic", "--epsilons", "inf", "--references", "none", "--merge", str(first), "--out", str(both), *small]) == 0
    again = json.loads(both.read_text())
    assert [r["ndcg@10"] for r in again["rows"]] == [r["ndcg@10"] for r in report["rows"]]
    assert again["merged_from"][0]["command"] == report["command"]
    with pytest.raises(SystemExit):
        privacy.main(["--data", "synthetic", "--epsilons", "inf", "--references", "none", "--merge", str(first), "--audit-holdout", "0.3", "--out", str(both)])
    assert "--merge" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a per-seed file merged into a fixed-split run: other users, refused
        privacy.main(["--data", "synthetic", "--epsilons", "inf", "--references", "none", "--merge", str(first), "--audit-split", "fixed", "--out", str(both)])
    assert "--audit-split" in capsys.readouterr().err


def test_ml1m_implicit_absent_is_reported_as_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRUSTREC_ML1M_IMPLICIT", str(tmp_path / "nowhere"))
    assert privacy.main(["--data", "ml1m-implicit", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "TRUSTREC_ML1M_IMPLICIT" in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, flag", [(["--models", "dp_als"], "--models"), (["--references", "nope"], "--references"), (["--epsilons", "0"], "--epsilons")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        privacy.main(["--data", "synthetic", *argv])
    assert flag in capsys.readouterr().err
