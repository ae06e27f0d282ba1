"""benchmarks/quality.py: the multi-seed summary (mean, population std, per-seed figures) and the
--seeds argument, checked by hand; the full ML-100k table stays a benchmark."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    return load_script(f"benchmarks/{name}.py")


quality = _load("quality")


def test_summarize_mean_std_per_seed_by_hand():
    # ndcg 0.40, 0.44, 0.45: mean 0.43; deviations -0.03, 0.01, 0.02 -> pstdev sqrt((9+1+4)e-4 / 3) = 0.021602
    # train_s 10, 12, 14: mean 12, pstdev sqrt(8 / 3) = 1.632993; `extra` is missing in seed 2 -> dropped
    per_seed = [{"ndcg@10": 0.40, "train_s": 10.0, "extra": 1.0}, {"ndcg@10": 0.44, "train_s": 12.0, "extra": 2.0}, {"ndcg@10": 0.45, "train_s": 14.0}]
    out = quality.summarize(per_seed)
    assert out["ndcg@10"] == 0.43 and out["ndcg@10_std"] == 0.0216
    assert out["train_s"] == 12.0 and out["train_s_std"] == 1.633
    assert "extra" not in out and "extra_std" not in out
    assert out["per_seed"] == [{"ndcg@10": 0.40, "train_s": 10.0}, {"ndcg@10": 0.44, "train_s": 12.0}, {"ndcg@10": 0.45, "train_s": 14.0}]


def test_summarize_one_seed_has_zero_std():
    out = quality.summarize([{"ndcg@10": 0.41234}])
    assert out == {"ndcg@10": 0.4123, "ndcg@10_std": 0.0, "per_seed": [{"ndcg@10": 0.4123}]}


@pytest.mark.parametrize("bad", ["a,b", ",", "1.5"])
def test_seeds_argument_errors_name_the_flag(bad, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--data", "synthetic", "--seeds", bad, "--peers", ""])
    assert "--seeds" in capsys.readouterr().err


time_to_target = _load("time_to_target")
TINY = ["--config", str(REPO / "configs" / "two_tower.yaml"), "--threads", "1", "--set", "data.synthetic.n_users=120", "--set", "data.synthetic.n_items=80",
        "--set", "trainer.epochs=2", "--set", "model.embedding_dim=8", "--set", "model.hidden_dim=8", "--set", "model.output_dim=8"]  # fmt: skip


@pytest.mark.parametrize("stage", ["select", "refit"])
def test_time_to_target_reports_the_first_epoch_at_or_above_the_target(tmp_path, stage):
    import json

    out = tmp_path / "t.json"
    assert time_to_target.main([*TINY, "--stage", stage, "--target", "0.0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["epoch"] for row in report["curve"]] == [1, 2]
    assert report["reached"] and report["epoch"] == 1 and report["seconds"] == report["curve"][0]["seconds"] > 0
    assert ("val/ndcg@10" in report["curve"][0]) == (stage == "select")  # the refit stage runs without validation
    # a target no list can reach: reported as missed, with the best figure seen
    assert time_to_target.main([*TINY, "--stage", stage, "--target", "1.01", "--out", str(out)]) == 0
    missed = json.loads(out.read_text())
    assert not missed["reached"] and missed["epoch"] is None and missed["seconds"] is None
    assert missed["best_test"] == max(row["test/ndcg@10"] for row in missed["curve"])
