"""The audit log (features/audit.py) as features/consent.py writes it, and `trustrec audit-log`:
entries hold an HMAC of the id under the erasure salt (computed by hand here), counts instead of
content, commit or roll back with the change they record, and outlive an erasure."""
import hashlib
import hmac
import json

import numpy as np
import pytest
import yaml
from sqlalchemy import func, select

from features.audit import AuditLog
from features.consent import consent_history, erase_user, iso, export_user, record_consent, record_event, set_preferences
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.store import FeatureStore, audit_table
from features.vocab import Vocab

SALT = "audit-test-salt"


def keyed(user_id: str) -> str:
    return hmac.new(SALT.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def tiny_dataset() -> Dataset:
    """alice: i1 @100, i2 @200, i3 @300; bob: i1 @150. Genres Comedy, Drama, Sci-Fi."""
    inter = Interactions(
        user=np.array([0, 0, 0, 1], np.int64), item=np.array([0, 1, 2, 0], np.int64),
        rating=np.array([4, 5, 3, 2], np.float32), timestamp=np.array([100, 200, 300, 150], np.int64),
    )  # fmt: skip
    return Dataset(
        "tiny", inter,
        Items(title=["One", "Two", "Three"], genres=[(0,), (1,), (2,)], year=np.array([1999, 2000, 2001], np.int32)),
        Users(np.array([30, UNKNOWN_AGE], np.int32), ["F", ""], ["artist", ""], [(), ()], [(), ()]),
        ["Comedy", "Drama", "Sci-Fi"], Vocab(["alice", "bob"], kind="user"), Vocab(["i1", "i2", "i3"], kind="item"),
    )  # fmt: skip


@pytest.fixture
def url(store_url, monkeypatch):  # a SQLite file, then a PostgreSQL database (tests/features/conftest.py)
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    return store_url


@pytest.fixture
def store(url):
    s = FeatureStore(url)
    s.load_dataset(tiny_dataset())
    yield s
    s.close()


@pytest.fixture
def audit(store, tmp_path):
    return AuditLog(store, table=True, path=tmp_path / "audit.jsonl")


def file_entries(audit: AuditLog) -> list[dict]:
    return [json.loads(line) for line in audit.path.read_text().splitlines()]


def brief(entries: list[dict]) -> list[tuple]:
    return [(e["action"], e["subject"], e["actor"], e["detail"]) for e in entries]


def test_an_entry_holds_the_keyed_hash_and_goes_to_both_sinks(store, audit):
    record_consent(store, "alice", {"training": False, "personalization": True}, source="app-settings", audit=audit, actor="user")
    (entry,) = audit.entries()
    assert brief([entry]) == [("consent", keyed("alice"), "user", {"purposes": {"training": False, "personalization": True}})]
    assert entry["subject"] == store.subject_hash("alice")  # the tombstone's hash
    assert file_entries(audit) == [entry]  # same entry, same fields, in the JSON-lines file
    assert entry["at"] == iso(entry["ts_ms"])  # ISO 8601 UTC of the same instant
    assert "app-settings" not in audit.path.read_text()  # a client's free text stays out of the log


def test_every_customer_action_is_audited_with_counts_only(store, audit):
    record_consent(store, "alice", {"training": True}, audit=audit, actor="user")
    set_preferences(store, "alice", liked_genres=["Comedy", "Comedy", "Drama"], blocked_items=["i3"], audit=audit, actor="user")
    record_event(store, "alice", "i2", timestamp=400, audit=audit, actor="user")
    record_consent(store, "bob", {"training": False, "personalization": False}, audit=audit, actor="admin")
    assert record_event(store, "bob", "i2", audit=audit, actor="admin") == {"stored": False, "for_training": False}  # not kept: not audited
    export_user(store, "alice", audit=audit, actor="admin")
    erase_user(store, "alice", audit=audit, actor="admin")
    a, b = keyed("alice"), keyed("bob")
    assert brief(audit.entries()) == [
        ("consent", a, "user", {"purposes": {"training": True}}),
        ("preferences", a, "user", {"replaced": {"liked_genres": 2, "blocked_items": 1}}),  # "Comedy" twice is stored once
        ("event", a, "user", {"for_training": True}),
        ("consent", b, "admin", {"purposes": {"training": False, "personalization": False}}),
        ("export", a, "admin", {"interactions": 3, "events": 1, "consent_records": 1}),
        # users 1, interactions 3, events 1, consent 1, blocked 1; popularity of i1, i2, i3 adjusted
        ("erasure", a, "admin", {"deleted": {"users": 1, "interactions": 3, "events": 1, "consent_ledger": 1, "blocked_items": 1, "privacy_spend": 0, "exposures": 0,
                                 "outcomes": 0},
         "popularity_adjusted_items": 3}),
    ]
    assert brief(file_entries(audit)) == brief(audit.entries())
    assert brief(audit.entries(subject=b)) == [("consent", b, "admin", {"purposes": {"training": False, "personalization": False}})]
    assert [e["action"] for e in audit.entries(action="event")] == ["event"]
    text = audit.path.read_text()
    assert not any(needle in text for needle in ('"alice"', '"bob"', "Comedy", "Drama", '"i2"', '"i3"'))


def test_an_entry_commits_and_rolls_back_with_its_change(store, audit, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("audit sink down")

    monkeypatch.setattr(audit, "record", failing)
    with pytest.raises(RuntimeError):
        record_consent(store, "alice", {"training": False}, audit=audit)
    assert consent_history(store, "alice") == []  # no change without its entry
    monkeypatch.undo()
    from features.consent import UnknownUserError

    with pytest.raises(UnknownUserError):
        erase_user(store, "nobody", audit=audit)  # rolled back: no entry for it either
    assert audit.entries() == [] and not audit.path.exists()
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(audit_table)) == 0


def test_erasure_keeps_the_entries_and_audit_log_finds_them_by_id(store, url, tmp_path, capsys):
    from cli.main import main

    config = tmp_path / "serve.yaml"  # the CLI writes where the serve config says serving writes
    config.write_text(yaml.safe_dump({"applications": [{"name": "trustrec", "args": {"store_url": url, "audit": {"table": True, "path": str(tmp_path / "cli.jsonl")}}}]}))
    audit = AuditLog(store, table=True, path=tmp_path / "cli.jsonl")
    record_consent(store, "alice", {"personalization": False}, audit=audit, actor="user")
    record_consent(store, "bob", {"training": True}, audit=audit, actor="user")
    assert main(["export-user", "alice", "--config", str(config)]) == 0
    assert main(["forget", "alice", "--config", str(config)]) == 0
    receipt = json.loads(capsys.readouterr().out.split("\n}\n", 1)[1])  # the second JSON printed
    assert receipt["tombstone"] == keyed("alice")
    assert main(["audit-log", "--user", "alice", "--config", str(config), "--json"]) == 0  # after the erasure
    out = capsys.readouterr().out
    got = [json.loads(line) for line in out.splitlines()]
    assert [(e["action"], e["actor"], e["subject"]) for e in got] == [
        ("consent", "user", keyed("alice")), ("export", "cli", keyed("alice")), ("erasure", "cli", keyed("alice")),
    ]  # fmt: skip
    assert "alice" not in out
    assert got == [e for e in file_entries(audit) if e["subject"] == keyed("alice")]  # table and file agree
    assert main(["audit-log", "--config", str(config), "--action", "erasure"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].split()[1:4] == ["erasure", keyed("alice")[:12], "cli"]
    assert main(["audit-log", "--config", str(config), "--since", "2999-01-01"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no entries" in captured.err
    assert main(["audit-log", "--config", str(config), "--since", "yesterday"]) == 2
    assert main(["audit-log", "--config", str(config), "--action", "login"]) == 2


def test_a_file_only_log_is_read_from_the_file(store, tmp_path, capsys):
    path = tmp_path / "only.jsonl"
    audit = AuditLog(store, table=False, path=path)
    record_consent(store, "alice", {"training": False}, audit=audit, actor="user")
    audit.record("model_swap", None, "replica:r1", {"old": None, "new": "3", "uri": "models:/trustrec@champion"})
    with path.open("a") as f:
        f.write('{"ts_ms": 1, "action": "ev')  # a line torn by a crash mid-write
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(audit_table)) == 0  # table off
    assert brief(audit.entries()) == [
        ("consent", keyed("alice"), "user", {"purposes": {"training": False}}),
        ("model_swap", None, "replica:r1", {"old": None, "new": "3", "uri": "models:/trustrec@champion"}),
    ]
    assert [e["action"] for e in audit.entries(subject=keyed("alice"))] == ["consent"]
    assert audit.entries(since_ms=audit.entries()[-1]["ts_ms"] + 1) == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    from cli.main import main

    assert main(["audit-log", "--store-url", store.engine.url.render_as_string(hide_password=False), "--config", str(tmp_path / "none.yaml"),
                 "--file", str(path), "--user", "alice", "--json"]) == 0  # fmt: skip
    assert [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()] == ["consent"]


def test_unknown_actions_are_refused_and_no_sink_is_a_no_op(store):
    with pytest.raises(ValueError, match="unknown audit action"):
        AuditLog(store).record("login", None, "admin")
    silent = AuditLog(None, table=True, path=None)  # the table needs a store
    assert not silent.enabled and silent.subject("alice") is None
    silent.record("model_swap", None, "cli", {"new": "1"})  # writes nowhere, raises nothing
