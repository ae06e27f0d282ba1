"""Bearer-token rules (serving/auth.py) and the model card (serving/users_api.py), without Ray;
the HTTP behaviour is in test_user_api.py."""
import base64
import hashlib
import hmac
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from serving.auth import Authenticator, user_token
from serving.config import AppArgs, AuthArgs
from serving.users_api import UsersService, model_card


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("TRUSTREC_ADMIN_TOKEN", "the-admin-token")
    monkeypatch.setenv("TRUSTREC_TOKEN_SECRET", "the-secret")


def status(fn) -> int:
    with pytest.raises(HTTPException) as err:
        fn()
    return err.value.status_code


def test_user_token_is_the_id_and_its_hmac():
    mac = hmac.new(b"the-secret", b"trustrec-user:u1", hashlib.sha256).hexdigest()
    assert user_token("the-secret", "u1") == f"{base64.urlsafe_b64encode(b'u1').decode().rstrip('=')}.{mac}"
    assert user_token("the-secret", "u1") != user_token("other-secret", "u1")


def test_who_may_act_for_whom(secrets_env):
    auth = Authenticator(AuthArgs())
    assert auth.check(user_token("the-secret", "u1"), "u1") == "user"
    assert auth.check("the-admin-token", "anyone") == "admin"
    evil = "1'; DROP TABLE users;--"
    assert auth.check(user_token("the-secret", evil), evil) == "user"
    assert status(lambda: auth.check(None, "u1")) == 401
    assert status(lambda: auth.check("", "u1")) == 401
    assert status(lambda: auth.check("garbage", "u1")) == 401
    assert status(lambda: auth.check("%%%.abc", "u1")) == 401  # not base64
    assert status(lambda: auth.check(user_token("other-secret", "u1"), "u1")) == 401  # forged
    mac = user_token("the-secret", "u2").split(".")[1]
    assert status(lambda: auth.check(f"{user_token('the-secret', 'u1').split('.')[0]}.{mac}", "u1")) == 401  # u2's mac on u1's id
    assert status(lambda: auth.check(user_token("the-secret", "u2"), "u1")) == 403  # genuine, someone else's
    with pytest.raises(HTTPException) as err:
        auth.check(None, "u1")
    assert err.value.headers == {"WWW-Authenticate": "Bearer"} and "u1" not in str(err.value.detail)


def test_admin_only_and_unconfigured(monkeypatch):
    monkeypatch.delenv("TRUSTREC_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("TRUSTREC_ADMIN_TOKEN", raising=False)
    assert status(lambda: Authenticator(AuthArgs()).check("anything", "u1")) == 503  # fails closed
    monkeypatch.setenv("OPS_TOKEN", "ops")
    auth = Authenticator(AuthArgs(admin_token_env="OPS_TOKEN"))
    assert auth.check("ops", "u1") == "admin"
    assert status(lambda: auth.check(user_token("whatever", "u1"), "u1")) == 401  # no user secret: user tokens invalid


def test_recommend_is_open_unless_configured(secrets_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    UsersService(AppArgs(store_url=url)).authorize_recommend("u1", None)  # open by default: no exception
    closed = UsersService(AppArgs(store_url=url, auth=AuthArgs(protect_recommend=True)))
    assert status(lambda: closed.authorize_recommend("u1", None)) == 401
    closed.authorize_recommend("u1", SimpleNamespace(credentials=user_token("the-secret", "u1")))
    assert status(lambda: closed.authorize_recommend("u1", SimpleNamespace(credentials=user_token("the-secret", "u2")))) == 403


def test_model_card_reads_privacy_and_snapshot_from_the_manifest():
    manifest = {
        "model": {"kind": "hybrid"},
        "features": {"user": ["history", "age"], "item": ["item_id"]},
        "metrics": {"test/ndcg@10": 0.25, "train/best_epoch": 3, "note": "not a number"},
        "provenance": {
            "exported_at": "2026-11-25T12:00:00Z", "dataset": "store:abc",
            "data": {"snapshot": "sha256:00ff", "users": 10, "items": 5, "interactions": 40},
            "privacy": {"mode": "dp", "epsilon": 3.5, "delta": 1e-5, "noise_multiplier": 1.1,
                        "ledger": {"entry": 2, "cumulative_epsilon": 5.5, "cumulative_delta": 2e-5, "releases": 2}},
        },
    }  # fmt: skip
    card = model_card(SimpleNamespace(manifest=manifest, model_version="7", provider="CPUExecutionProvider"))
    assert card["model_version"] == "7" and card["kind"] == "hybrid" and card["data_snapshot"] == "sha256:00ff"
    assert card["metrics"] == {"test/ndcg_at_10": 0.25, "train/best_epoch": 3.0}  # an older bundle's name, as MLflow shows it
    ledger = manifest["provenance"]["privacy"]["ledger"]
    assert card["privacy"] == {"mode": "dp", "epsilon": 3.5, "delta": 1e-5, "cumulative_epsilon": 5.5, "cumulative_delta": 2e-5,
                               "details": {"epsilon": 3.5, "delta": 1e-5, "noise_multiplier": 1.1, "ledger": ledger}}  # fmt: skip
    plain = model_card(SimpleNamespace(manifest={**manifest, "provenance": {}}, model_version="1", provider="CPU"))
    none = {"mode": "none", "epsilon": None, "delta": None, "cumulative_epsilon": None, "cumulative_delta": None, "details": {}}
    assert plain["privacy"] == none and plain["data_snapshot"] is None
