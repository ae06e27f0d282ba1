"""The exposure log and outcomes (features/exposures.py) on a real SQLite file and a real
PostgreSQL database: bounded queue, batches, the outcome join and its refusals, erasure."""
import time

import pytest
from sqlalchemy import func, select

from features.consent import erase_user
from features.exposures import Exposure, ExposureLog, OutcomeError, exposures, new_exposure_id, outcomes, record_outcome
from features.store import FeatureStore, exposures_table
from tests.features.test_consent import cells_equal, tiny_dataset


@pytest.fixture
def store(store_url, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "exposure-test-salt")
    s = FeatureStore(store_url)
    s.load_dataset(tiny_dataset())
    yield s
    s.close()


def shown(store, user, arm="treatment", eid=None, ts=1_000):
    return Exposure(eid or new_exposure_id(), store.subject_hash(user), "rec-v2", arm, arm, "3", False,
                    [("i2", 0.9, 0.85), ("i4", 0.5, 0.05)], ts)  # fmt: skip


def count(store):
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(exposures_table))


def test_a_full_queue_drops_and_counts_instead_of_blocking(store):
    log = ExposureLog(store, capacity=3, batch=100, interval_s=60)  # nothing flushes on its own during the test
    results = [log.append(shown(store, "alice")) for _ in range(5)]
    assert results == [True, True, True, False, False] and log.dropped == 2 and count(store) == 0
    log.close()
    assert count(store) == 3 and log.written == 3


def test_batches_are_written_in_the_background(store):
    log = ExposureLog(store, capacity=100, batch=4, interval_s=60)
    ids = [new_exposure_id() for _ in range(4)]
    for i, eid in enumerate(ids):
        log.append(shown(store, "bob", eid=eid, ts=2_000 + i))
    deadline = time.monotonic() + 10  # a full batch wakes the writer at once, not after interval_s (60 s)
    while count(store) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count(store) == 4
    rows = exposures(store, "rec-v2")
    assert [r["exposure_id"] for r in rows] == ids and rows[0]["items"] == [["i2", 0.9, 0.85], ["i4", 0.5, 0.05]]
    assert rows[0]["subject"] == store.subject_hash("bob") and rows[0]["model_version"] == "3"
    log.close()


def test_outcomes_join_to_the_users_own_exposure_only(store):
    log = ExposureLog(store, capacity=100, batch=100, interval_s=60)
    mine, theirs = shown(store, "alice"), shown(store, "bob")
    log.append(mine), log.append(theirs)  # still queued: the lookup flushes first
    got = record_outcome(store, "alice", mine.exposure_id, "click", 1, item_id="i4", exposure_log=log)
    assert got == {"exposure_id": mine.exposure_id, "kind": "click", "position": 1, "recorded": True}
    record_outcome(store, "alice", mine.exposure_id, "dwell", 12.5)
    with pytest.raises(OutcomeError, match="exposure_id: unknown exposure for this user"):
        record_outcome(store, "alice", theirs.exposure_id, "click", 1)  # bob's: refused as if it did not exist
    with pytest.raises(OutcomeError, match="exposure_id: unknown"):
        record_outcome(store, "alice", "f" * 32, "click", 1)
    with pytest.raises(OutcomeError, match="item_id: was not shown"):
        record_outcome(store, "alice", mine.exposure_id, "click", 1, item_id="i1")
    for kind, value, field in (("like", 1, "kind"), ("click", 2, "value"), ("dwell", -1, "value"), ("rating", float("nan"), "value")):
        with pytest.raises(OutcomeError, match=f"^{field}:"):
            record_outcome(store, "alice", mine.exposure_id, kind, value)
    assert [(o["kind"], o["position"], o["value"]) for o in outcomes(store, "rec-v2")] == [("click", 1, 1.0), ("dwell", None, 12.5)]
    log.close()


def test_erasure_deletes_the_users_exposures_and_outcomes_only(store):
    log = ExposureLog(store, capacity=100, batch=100, interval_s=60)
    a, b = shown(store, "alice"), shown(store, "bob")
    log.append(a), log.append(b)
    log.flush()
    record_outcome(store, "alice", a.exposure_id, "click", 1, item_id="i2")
    record_outcome(store, "bob", b.exposure_id, "purchase", 1)
    assert cells_equal(store, "alice") != [] and not any(t in ("exposures", "outcomes") for t, _ in cells_equal(store, "alice"))
    receipt = erase_user(store, "alice")
    assert receipt["deleted"]["exposures"] == 1 and receipt["deleted"]["outcomes"] == 1
    assert [r["exposure_id"] for r in exposures(store, "rec-v2")] == [b.exposure_id]
    assert [o["kind"] for o in outcomes(store, "rec-v2")] == ["purchase"]
    log.close()


def test_an_outcome_waits_for_an_exposure_queued_on_another_replica(store):
    other = ExposureLog(store, capacity=100, batch=100, interval_s=0.1)  # another replica's writer, due every 0.1 s
    exposure = shown(store, "bob")
    other.append(exposure)
    assert record_outcome(store, "bob", exposure.exposure_id, "click", 1, wait_s=2.0)["recorded"]
    stuck = ExposureLog(store, capacity=100, batch=100, interval_s=60)  # one that will not write in time
    late = shown(store, "bob")
    stuck.append(late)
    with pytest.raises(OutcomeError, match="exposure_id: unknown"):
        record_outcome(store, "bob", late.exposure_id, "click", 1, wait_s=0.2)
    other.close(), stuck.close()
