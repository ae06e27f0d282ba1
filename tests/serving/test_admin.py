"""serving/admin.py, what `trustrec forget` / `export-user` / `audit-log` call: the serve config's
settings, the --since parser, and the refusals that name what is missing (the whole commands run
in tests/features/test_consent.py and test_audit_log.py)."""
from __future__ import annotations

import pytest
import yaml

from features.consent import UnknownUserError
from serving.admin import audit_entries, operator_args, since_ms, user_data
from serving.config import AppArgs


def test_since_is_iso_8601_naive_meaning_utc():
    # 2026-01-31: 56 years after 1970 with 14 leap days (1972..2024) = 20454 days to 2026-01-01, + 30
    assert since_ms("2026-01-31") == (56 * 365 + 14 + 30) * 86_400_000 == 1_769_817_600_000
    assert since_ms("2026-01-31T12:00:00+02:00") == 1_769_817_600_000 + 10 * 3_600_000  # 10:00 UTC
    assert since_ms("2026-01-31T12:00:00Z") == 1_769_817_600_000 + 12 * 3_600_000
    assert since_ms(None) is None and since_ms("") is None
    with pytest.raises(ValueError, match="--since 'yesterday': not an ISO 8601"):
        since_ms("yesterday")


def test_operator_args_come_from_the_serve_config_unless_only_a_store_url_is_given(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "trustrec", "args": {"store_url": "sqlite:///x.db", "audit": {"table": False}}}]}))
    args = operator_args(config)
    assert args.store_url == "sqlite:///x.db" and args.audit.table is False
    assert operator_args(config, "sqlite:///y.db").audit.table is False  # the file exists: its settings hold
    assert operator_args(tmp_path / "none.yaml", "sqlite:///y.db") == AppArgs()  # a store URL alone is enough
    with pytest.raises(FileNotFoundError, match=r"none.yaml: no such file \(a serve config, for the store URL and consent regime; or pass --store-url\)"):
        operator_args(tmp_path / "none.yaml")  # neither: `trustrec forget` outside the checkout says what the file is for


def test_refusals_name_what_is_missing(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "trustrec", "args": {"store_url": None}}]}))
    with pytest.raises(ValueError, match="store_url is null; pass --store-url"):
        user_data("forget", "u1", config)
    with pytest.raises(ValueError, match="action 'delete': forget or export"):
        user_data("delete", "u1", config)
    with pytest.raises(ValueError, match="pass --store-url \\(or --file"):
        audit_entries(config)
    with pytest.raises(ValueError, match="--action 'login': one of consent"):
        audit_entries(config, action="login")
    with pytest.raises(ValueError, match="--user needs the feature store"):
        audit_entries(config, file=str(tmp_path / "a.jsonl"), user="u1")


def test_user_data_on_a_store_without_the_user(tmp_path):
    from features.store import FeatureStore

    url = f"sqlite:///{tmp_path}/features.db"
    FeatureStore(url).close()  # an existing, empty store
    with pytest.raises(UnknownUserError):
        user_data("export", "nobody", tmp_path / "none.yaml", url)
    with pytest.raises(UnknownUserError):
        user_data("forget", "nobody", tmp_path / "none.yaml", url)


def test_a_mistyped_store_path_is_refused_and_never_created(tmp_path):
    """forget / export-user / audit-log on a SQLite path that does not exist: an error naming where
    the URL came from, and no new empty store (which would answer "no data held for this user" and
    let an operator believe an erasure had nothing to erase)."""
    from cli.main import main

    typo = tmp_path / "featuers.db"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "trustrec", "args": {"store_url": f"sqlite:///{typo}"}}]}))
    for action in ("forget", "export"):
        with pytest.raises(ValueError, match=f"--store-url: no such file {typo}"):
            user_data(action, "u1", tmp_path / "none.yaml", f"sqlite:///{typo}")
        with pytest.raises(ValueError, match=f"{config}: args.store_url: no such file {typo}"):
            user_data(action, "u1", config)
    with pytest.raises(ValueError, match=f"--store-url: no such file {typo}"):
        audit_entries(tmp_path / "none.yaml", f"sqlite:///{typo}")
    for argv in (["forget", "u1"], ["export-user", "u1"], ["audit-log"]):
        assert main([*argv, "--config", str(config)]) == 2
    assert not typo.exists()
