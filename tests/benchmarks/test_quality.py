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
    out = quality.harness.summarize(per_seed)
    assert out["ndcg@10"] == 0.43 and out["ndcg@10_std"] == 0.0216
    assert out["train_s"] == 12.0 and out["train_s_std"] == 1.633
    assert "extra" not in out and "extra_std" not in out
    assert out["per_seed"] == [{"ndcg@10": 0.40, "train_s": 10.0}, {"ndcg@10": 0.44, "train_s": 12.0}, {"ndcg@10": 0.45, "train_s": 14.0}]


def test_summarize_one_seed_has_zero_std():
    out = quality.harness.summarize([{"ndcg@10": 0.41234}])
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


# ---------------------------------------------------------------- --data for any dataset, end to end

TINY_MODEL = ["--set", "trainer.epochs=2", "--set", "model.embedding_dim=8", "--set", "model.hidden_dim=8", "--set", "model.output_dim=8", "--set", "trainer.num_threads=1"]


def _lines_file(path: Path, n_users: int = 40, n_items: int = 30, seed: int = 0, test: bool = False) -> Path:
    """`user item item ...` lines (6-11 items a user, popular items likelier); with test=True a second
    file `test.txt` beside it holds 2 more items a user."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(8, 14)), replace=False, p=weights / weights.sum())
        train.append(" ".join(map(str, [u, *items[2:]])))
        held.append(" ".join(map(str, [u, *items[:2]])))
    path.write_text("\n".join(train) + "\n")
    if test:
        (path.parent / "test.txt").write_text("\n".join(held) + "\n")
    return path


def test_any_dataset_end_to_end_one_json_per_dataset_with_spec_label_and_peer_params(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(quality.harness, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    a = _lines_file(tmp_path / "a" / "train.txt")
    args = ["--peers", "popularity,ease", "--seeds", "0", "--models", "trustrec-two-tower", "--in-process", *TINY_MODEL]
    assert quality.main(["--data", f"lines:{a}", *args]) == 0
    # a second dataset, shipped with its test part, named through a YAML data block: the given split by default
    _lines_file(tmp_path / "b" / "train.txt", seed=1, test=True)
    (tmp_path / "b.yaml").write_text("data:\n  source: lines\n  lines: {path: b/train.txt, test_path: b/test.txt}\n")
    assert quality.main(["--data", "table:b.yaml", *args]) == 0
    first = json.loads((tmp_path / "results" / "quality_lines-a-train_stratified.json").read_text())
    second = json.loads((tmp_path / "results" / "quality_table-b_given.json").read_text())  # the first file is not overwritten
    assert first["dataset"] == "lines-a-train" and first["data"]["spec"] == f"lines:{a}" and first["split"] == "stratified"
    assert (first["data"]["users"], first["data"]["items"]) == (40, 30)
    assert second["dataset"] == "table-b" and second["split"] == "given" and second["protocol"] == "the dataset's own train/test split"
    assert second["data"]["rows"]["test"] == 40 * 2  # test.txt exactly: 2 items for each of the 40 users
    assert first["data"]["rows"]["train"] + first["data"]["rows"]["val"] + first["data"]["rows"]["test"] == first["data"]["interactions"]
    assert second["models"]["trustrec-two-tower"]["per_seed"][0]["ndcg@10"] == second["models"]["trustrec-two-tower"]["ndcg@10"]
    for report in (first, second):
        models = report["models"]
        assert set(models) == {"trustrec-two-tower", "popularity", "ease"}
        assert models["trustrec-two-tower"]["config"]["file"] == "configs/two_tower.yaml"  # the generic recipe, data overrides only
        assert models["ease"]["params"][0]["lam"] in [50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0] and models["popularity"]["params"] == [{}]
        assert all(0 <= models[m]["ndcg@10"] <= 1 for m in models)
    assert "split.protocol=given" in second["models"]["trustrec-two-tower"]["config"]["overrides"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "nope"], "--data: unknown dataset 'nope'"),
        (["--data", "csv:/no/such/file.csv"], "--data csv:/no/such/file.csv: file not found"),
        (["--data", "synthetic", "--protocol", "given"], "--protocol given: --data synthetic ships no test part"),
    ],
)
def test_data_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main([*argv, "--peers", ""])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_models_of_a_dataset_are_the_generic_recipes_except_ml100k():
    assert quality.configs("ml100k")["trustrec-two-tower"] == "two_tower_ml100k.yaml"
    for kind in ("ml1m-implicit", "csv", "lines", "table", "synthetic"):
        chosen = quality.configs(kind)
        assert chosen["trustrec-two-tower"] == "two_tower.yaml" and chosen["trustrec-hybrid"] == "hybrid.yaml"
        assert not any("ml100k" in f for f in chosen.values())


def test_cost_columns_come_from_a_process_per_phase_and_the_in_process_run_has_the_same_quality(tmp_path):
    import json

    a = _lines_file(tmp_path / "a" / "train.txt")
    args = ["--data", f"lines:{a}", "--models", "trustrec-two-tower", "--peers", "popularity", "--seeds", "0", *TINY_MODEL]
    assert quality.main([*args, "--out", str(tmp_path / "child.json")]) == 0
    assert quality.main([*args, "--in-process", "--out", str(tmp_path / "here.json")]) == 0
    child, here = (json.loads((tmp_path / f"{n}.json").read_text())["models"] for n in ("child", "here"))
    ours = child["trustrec-two-tower"]
    for key in ("train_peak_mb", "evaluate_peak_mb", "serve_peak_mb", "pipeline_s", "bundle_mb", "served_mb", "serve_ms"):
        assert ours[key] > 0, key
    assert ours["served_mb"] <= ours["bundle_mb"] and ours["pipeline_s"] >= ours["train_s"]
    assert child["popularity"]["train_peak_mb"] > 0
    assert "train_peak_mb" not in here["trustrec-two-tower"] and "serve_peak_mb" not in here["trustrec-two-tower"]
    for model in ("trustrec-two-tower", "popularity"):  # the same seeded run in a child process and here
        assert here[model]["ndcg@10"] == child[model]["ndcg@10"]


def test_models_empty_runs_the_peers_alone_on_the_same_split(tmp_path, capsys):
    import json

    a = _lines_file(tmp_path / "a" / "train.txt")
    out = tmp_path / "peers.json"
    assert quality.main(["--data", f"lines:{a}", "--models", "", "--peers", "popularity", "--seeds", "0,1", "--in-process", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"popularity"} and len(report["models"]["popularity"]["per_seed"]) == 2
    with pytest.raises(SystemExit) as e:
        quality.main(["--data", "synthetic", "--models", "", "--peers", ""])
    assert e.value.code == 2 and "--models / --peers" in capsys.readouterr().err
