"""The privacy-budget ledger (features/privacy_ledger.py) on a real SQLite file and a real
PostgreSQL database: composition by hand, refusals that release nothing, erasure leaving the
accounting, no ids stored, and two trainings racing for the last of a budget."""
import threading

import pytest
from sqlalchemy import func, select

from features.consent import erase_user
from features.privacy_ledger import BudgetExceeded, check, entries, record, spent
from features.store import FeatureStore, privacy_ledger_table, privacy_spend_table

from tests.features.test_consent import cells_equal, tiny_dataset

SALT = "ledger-test-salt"


@pytest.fixture
def store(store_url, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    s = FeatureStore(store_url)
    s.load_dataset(tiny_dataset())  # alice, bob and an injection-shaped id, with histories
    yield s
    s.close()


def release(store, users, eps, delta, total=None, snapshot="sha256:x"):
    return record(store, users, snapshot=snapshot, mechanism="dp-sgd (opacus)", accountant="rdp", epsilon=eps, delta=delta, total=total)


def test_spend_composes_per_user_and_the_worst_off_user_is_the_figure(store):
    first = release(store, ["alice", "bob"], 2.0, 1e-5)
    assert first["cumulative_epsilon"] == 2.0 and first["cumulative_delta"] == pytest.approx(1e-5) and first["releases"] == 1
    second = release(store, ["bob", "carol"], 3.0, 1e-6)  # bob: 2 + 3; carol: 3
    assert second["cumulative_epsilon"] == 5.0 and second["cumulative_delta"] == pytest.approx(1.1e-5) and second["releases"] == 2
    assert spent(store, ["alice"]).epsilon == 2.0 and spent(store, ["carol"]).epsilon == 3.0
    assert spent(store, ["alice", "carol"]).to_json() == {"epsilon": 3.0, "delta": pytest.approx(1e-6), "releases": 1}
    assert spent(store).epsilon == 5.0 and spent(store, ["dave"]).epsilon == 0.0  # everyone; a user never covered
    rows = entries(store)
    assert [(r["epsilon"], r["users"], r["still_covered"]) for r in rows] == [(2.0, 2, 2), (3.0, 2, 2)]


def test_a_release_past_the_budget_is_refused_and_leaves_the_ledger_as_it_was(store):
    release(store, ["alice", "bob"], 4.0, 1e-5, total=10)
    assert check(store, ["alice"], 6.0, total=10).epsilon == 4.0  # exactly the budget: allowed
    with pytest.raises(BudgetExceeded, match=r"privacy.total_epsilon: .*epsilon 6.5 .*already spent epsilon 4 .*10.5 > the total budget 10") as e:
        release(store, ["bob", "carol"], 6.5, 1e-5, total=10)
    assert "bob" not in str(e.value) and "alice" not in str(e.value)  # no id in the message
    with pytest.raises(BudgetExceeded):
        check(store, ["bob"], 6.5, total=10)
    assert len(entries(store)) == 1 and spent(store, ["carol"]).epsilon == 0.0  # nothing recorded for the refused one
    assert release(store, ["carol"], 6.5, 1e-5, total=10)["cumulative_epsilon"] == 6.5  # other users: their own budget
    assert check(store, ["alice"], 100.0, total=None).epsilon == 4.0  # no budget configured: never refused


def test_a_run_under_another_salt_is_refused_instead_of_resetting_the_budget(store, store_url, monkeypatch):
    """Entries are keyed by hashes under the salt: under another one every user would look new, with
    nothing spent. The first entry pins the salt's fingerprint; any other salt is refused, and the
    right one still composes."""
    from features.store import ErasureSaltError

    release(store, ["alice", "bob"], 4.0, 1e-5, total=5)
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "another-salt")
    other = FeatureStore(store_url)
    try:
        with pytest.raises(ErasureSaltError, match="TRUSTREC_ERASURE_SALT differs"):
            check(other, ["alice"], 4.0, total=5)
    finally:
        other.close()
    monkeypatch.delenv("TRUSTREC_ERASURE_SALT")
    unset = FeatureStore(store_url)
    try:
        with pytest.raises(ErasureSaltError, match="not set"):
            unset.check_erasure_salt()  # what training and serving run at start-up
    finally:
        unset.close()
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    again = FeatureStore(store_url)
    try:
        with pytest.raises(BudgetExceeded):
            check(again, ["alice"], 4.0, total=5)
    finally:
        again.close()


def test_ids_are_kept_only_as_keyed_hashes_and_erasure_leaves_the_accounting(store):
    release(store, ["alice", "bob"], 2.0, 1e-5)
    release(store, ["alice"], 3.0, 1e-5)
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(privacy_spend_table)) == 3
        hashes = set(conn.scalars(select(privacy_spend_table.c.subject_hash)))
    assert hashes == {store.subject_hash("alice"), store.subject_hash("bob")}
    assert cells_equal(store, "alice") != []  # alice's history is still in the store ...
    receipt = erase_user(store, "alice")
    assert receipt["deleted"]["privacy_spend"] == 2
    assert cells_equal(store, "alice") == []  # ... and after erasure no table holds the id
    assert spent(store).to_json() == {"epsilon": 2.0, "delta": pytest.approx(1e-5), "releases": 1}  # bob's is the worst now
    assert [r["still_covered"] for r in entries(store)] == [1, 0]  # the entries stay, as counts
    assert release(store, ["bob"], 8.0, 1e-5, total=10)["cumulative_epsilon"] == 10.0


def test_two_trainings_racing_for_the_last_of_a_budget_cannot_both_spend_it(store):
    release(store, ["alice"], 6.0, 1e-5, total=10)
    barrier, outcomes = threading.Barrier(2), []

    def train():
        barrier.wait()
        try:
            release(store, ["alice"], 3.0, 1e-5, total=10)
            outcomes.append("released")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=train) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["refused", "released"]  # 6 + 3 fits, 6 + 3 + 3 does not
    assert spent(store, ["alice"]).epsilon == 9.0
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(privacy_ledger_table)) == 2
