"""benchmarks/harness.py: dataset resolution (argument > env var > ../shared/data), seed lists, the
machine description and the JSON every benchmark writes (command, date, machine; --record)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re

import numpy as np
import pytest

from tests.conftest import load_script

load_script("benchmarks/results_page.py")  # puts benchmarks/ on sys.path: the `harness` the scripts import
harness = importlib.import_module("harness")


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="bench")


def fake_movielens(root, files):
    root.mkdir(parents=True)
    for f in files:
        (root / f).write_text("x", encoding="utf-8")
    return root


def test_synthetic_and_unknown_datasets(capsys):
    assert harness.dataset(parser(), "synthetic") == harness.Data("synthetic", None, [])
    assert harness.dataset(parser(), "synthetic", source=True).overrides == ["data.source=synthetic"]
    with pytest.raises(SystemExit) as e:
        harness.dataset(parser(), "ml1m-implicit")  # not allowed by default
    assert e.value.code == 2 and "--data: unknown dataset 'ml1m-implicit' (ml100k or synthetic)" in capsys.readouterr().err


def test_ml100k_path_argument_beats_env_var_which_beats_the_shared_default(tmp_path, monkeypatch):
    env = fake_movielens(tmp_path / "env", ["u.data", "u.item", "u.user"])
    arg = fake_movielens(tmp_path / "arg", ["u.data", "u.item", "u.user"])
    monkeypatch.setattr(harness, "SHARED", tmp_path / "nowhere")
    monkeypatch.setenv("TRUSTREC_ML100K", str(env))
    assert harness.dataset(parser(), "ml100k", source=True) == harness.Data("ml100k", env, ["data.source=movielens", f"data.path={env}"])
    assert harness.dataset(parser(), f"ml100k:{arg}").overrides == [f"data.path={arg}"]
    monkeypatch.delenv("TRUSTREC_ML100K")
    fake_movielens(tmp_path / "nowhere" / "ml-100k", ["u.data", "u.item", "u.user"])
    assert harness.dataset(parser(), "ml100k").path == tmp_path / "nowhere" / "ml-100k"


def test_missing_dataset_is_skipped_naming_the_folder_and_the_env_var(tmp_path, monkeypatch, capsys):
    partial = fake_movielens(tmp_path / "ml1m", ["train.txt"])
    monkeypatch.setenv("TRUSTREC_ML1M_IMPLICIT", str(partial))
    assert harness.dataset(parser(), "ml1m-implicit", ["ml1m-implicit"]) is None
    err = capsys.readouterr().err
    assert err.startswith(f"skipped: ml1m-implicit not found at {partial} (TRUSTREC_ML1M_IMPLICIT; missing test.txt)")
    (partial / "test.txt").write_text("0 1 2\n", encoding="utf-8")
    assert harness.dataset(parser(), "ml1m-implicit", ["ml1m-implicit"]).overrides == [f"data.path={partial}"]


def test_numbers_lists_and_errors_naming_the_flag(capsys):
    assert harness.numbers(parser(), "--seeds", "0,1,,2") == [0, 1, 2]
    assert harness.numbers(parser(), "--epsilons", "8,inf,0.5", float) == [8.0, float("inf"), 0.5]
    with pytest.raises(SystemExit):
        harness.numbers(parser(), "--seeds", "1.5")
    assert "--seeds: expected comma-separated integers, got '1.5'" in capsys.readouterr().err


def test_machine_names_cpu_cores_ram_and_library_versions():
    m = harness.machine(["scipy", "no-such-distribution-xyz"])
    import scipy

    assert m["cores"] == os.cpu_count() and m["libraries"] == {"numpy": np.__version__, "scipy": scipy.__version__}
    with open("/proc/meminfo") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    assert m["ram_gib"] == round(kib / 2**20, 1)
    assert m["cpu"] and (m["gpu"] is None or isinstance(m["gpu"], str))
    described = harness.describe({**m, "cpu": "CPU X", "cores": 4, "ram_gib": 15.6, "gpu": "NVIDIA H100", "python": "3.11.7", "libraries": {"torch": "2.13.0"}})
    assert described == "CPU X, 4 cores, 15.6 GiB RAM, NVIDIA H100; Python 3.11.7, torch 2.13.0"


def test_write_puts_command_date_machine_first_and_records_on_request(tmp_path, monkeypatch, capsys):
    record = tmp_path / "docs" / "results"
    monkeypatch.setattr(harness, "RECORD", record)
    for var in harness.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "scratch" / "x.json"
    args = argparse.Namespace(out=str(out), record=False)
    report = {"k": np.int64(10), "results": {"item_cold_start": {"hybrid/ndcg@10": np.float32(0.5), "content/ndcg@10": 0.25}},
              "goals": {"item_ratio_vs_content": {"goal": 1.5, "value": 2.0, "met": True}}}  # fmt: skip
    assert harness.write(report, args, "cold_start_synthetic", script="/any/where/cold_start.py", argv=["--data", "synthetic", "--set", "a b"]) == out
    written = json.loads(out.read_text(encoding="utf-8"))
    assert list(written)[:4] == ["command", "date", "machine", "k"]
    assert written["command"] == "python benchmarks/cold_start.py --data synthetic --set 'a b'"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", written["date"]) and written["machine"]["cores"] == os.cpu_count()
    assert written["k"] == 10 and written["results"]["item_cold_start"]["hybrid/ndcg@10"] == 0.5  # numpy scalars as plain numbers
    assert not record.exists()  # no --record: scratch only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a thread count set in the environment is part of the command
    assert harness.command("x/dp_ease.py", ["--data", "ml100k"]) == "OMP_NUM_THREADS=1 python benchmarks/dp_ease.py --data ml100k"
    monkeypatch.delenv("OMP_NUM_THREADS")

    harness.write(report, argparse.Namespace(out=str(out), record=True), "cold_start_synthetic", script="cold_start.py", argv=[])
    assert json.loads((record / "cold_start_synthetic.json").read_text(encoding="utf-8"))["goals"] == report["goals"]
    page = (tmp_path / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    assert "| synthetic: item cold start: hybrid NDCG@10 ≥ 1.5× content-only | 2.00× (0.5000 vs 0.2500) | met | `python benchmarks/cold_start.py` |" in page
    assert "recorded docs/results/cold_start_synthetic.json" in capsys.readouterr().err


def test_table_by_hand():
    assert harness.table(["model", "ndcg"], [["ease", 0.48091], ["pop", None]], first=6, width=8).splitlines() == [
        "model     ndcg", "ease    0.4809", "pop          -"]
    # one number of decimals per column after the first
    assert harness.table(["x", "a", "b"], [["r", 0.48091, 2.7]], digits=(2, 0), first=2, width=6).splitlines() == ["x      a     b", "r   0.48     3"]


def test_summarize_and_users_with_by_hand():
    # mean of 0.2 and 0.4 = 0.3, population std = 0.1; "c" is not in every seed's figures: left out
    out = harness.summarize([{"a": 0.2, "b": 1.0, "c": 5.0}, {"a": 0.4, "b": 1.0}])
    assert out == {"a": 0.3, "a_std": 0.1, "b": 1.0, "b_std": 0.0, "per_seed": [{"a": 0.2, "b": 1.0}, {"a": 0.4, "b": 1.0}]}
    # indptr [0, 2, 2, 3]: users 0 and 2 have interactions, user 1 none
    assert harness.users_with((np.array([0, 2, 2, 3]), np.array([4, 5, 6]))).tolist() == [0, 2]


def test_stats_by_hand():
    # numpy's linear interpolation over [1, 2, 3, 4]: p50 at rank 1.5 -> 2.5, p95 at rank 2.85 -> 3.85, p99 at 2.97 -> 3.97
    assert harness.stats([4, 1, 3, 2]) == {"p50_ms": 2.5, "p95_ms": 3.85, "p99_ms": 3.97, "max_ms": 4.0}
    assert harness.stats([1, 2, 3, 4], ("p50", "max", "mean", "n"), suffix="", digits=None) == {"p50": 2.5, "max": 4.0, "mean": 2.5, "n": 4}
    assert harness.stats([0.12345, 0.12345], ("p50",)) == {"p50_ms": 0.123} and harness.stats([0.12345], ("p50",), digits=None) == {"p50_ms": 0.12345}
    assert harness.stats([], ("n", "p50", "max")) == {"n": 0, "p50_ms": None, "max_ms": None}  # an empty sample: no figure, no error


def test_parser_repo_relative():
    p = harness.parser("what it measures", "cold_start_<data>")
    assert p.description == "what it measures" and vars(p.parse_args(["--record"])) == {"out": None, "record": True}
    assert "--out" not in harness.parser(None).format_help()  # no name: no output flags
    assert harness.repo_relative(harness.REPO / "configs" / "serve.yaml") == "configs/serve.yaml"
    assert harness.repo_relative("/elsewhere/serve.yaml") == "/elsewhere/serve.yaml"
