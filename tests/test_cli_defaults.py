"""The CLI's default training config outside the repository: a user who runs `trustrec privacy-budget
--store-url URL` from another directory gets the ledger, not "config file not found"."""
from __future__ import annotations

import pytest

from cli.main import DEFAULT_CONFIG, default_config, main
from features.store import FeatureStore

from tests.conftest import REPO


def test_privacy_budget_with_a_store_url_works_from_any_directory(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'features.db'}"
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "cli-defaults-salt")
    FeatureStore(url).close()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert default_config() == str(REPO / DEFAULT_CONFIG)  # the checkout's own
    assert main(["privacy-budget", "--store-url", url]) == 0
    assert "no private release recorded in this store" in capsys.readouterr().out
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "two_tower.yaml").write_text("privacy:\n  total_epsilon: 3\n")
    assert default_config() == DEFAULT_CONFIG  # the working directory's wins
    assert main(["privacy-budget", "--store-url", url, "--json"]) == 0
    assert '"budget_epsilon": 3.0' in capsys.readouterr().out


def test_commands_on_runs_refuse_a_missing_registry_and_create_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = "0123456789abcdef0123456789abcdef"
    for argv in (["promote", run], ["report", run], ["audit", "privacy", run]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"no MLflow registry at {tmp_path / 'mlflow.db'} (not created)" in err, err
    assert list(tmp_path.iterdir()) == []


def test_recommend_before_any_training_names_the_missing_registry_then_the_missing_model(tmp_path):
    """As a new user runs it, in a fresh process (MLflow caches one store per URI string, so in this
    test process "sqlite:///mlflow.db" could still mean another test's working directory)."""
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    url = f"sqlite:///{tmp_path / 'features.db'}"
    FeatureStore(url).close()
    argv = [str(Path(sys.executable).parent / "trustrec"), "recommend", "u1", "--store-url", url]
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"no MLflow registry at {tmp_path / 'mlflow.db'}" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # MLflow would have created an empty one
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("trustrec")  # a registry without the model
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "has no such model version" in out.stderr and "`trustrec train` registers @champion" in out.stderr, out.stderr[-2000:]


def test_serve_refuses_a_drain_window_that_is_not_seconds(capsys):
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--drain-seconds", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--drain-seconds" in err and f"'{bad}' is not a number of seconds >= 0" in err, err
