"""Customer control over the feature store: consent, stated preferences, events, access, erasure,
and the consent-honouring training export.

One code path for the HTTP API (serving/users_api.py) and the operator CLI (`trustrec forget`,
`trustrec export-user`). The tables live in features/store.py.

- Consent: an append-only ledger (user, purpose, granted, time, source); the current state of a
  purpose is its latest record, or the configured regime's default (ConsentConfig.regime) when
  the user never answered. Purposes: `personalization` (a tailored list), `training` (the user's
  rows may train models), `demographics` (age / gender / occupation may feed models).
- Stated preferences: liked and avoided genres (validated against the catalog) and blocked items
  (validated against the items table).
- Events: interactions recorded through the API; kept only under personalization or training
  consent, and exported for training only when `training` consent held when recorded and still holds.
- Erasure: every row about the user, from every table, in one transaction, plus a tombstone keyed
  by a salted hash of the id, so later bulk loads and training exports leave the user out.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, select, update

from features.audit import AuditLog
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.store import (
    USER_TABLES, FeatureStore, _split_genres, blocked_table, consent_table, events_table, exposures_table, interactions_table,
    items_table, outcomes_table, popularity_table, privacy_spend_table, tombstones_table, users_table,
)
from features.vocab import Vocab

PURPOSES = ("personalization", "training", "demographics")
MAX_LIST = 1000  # stated genres / blocked items per user: a bound on what one request may write


class ConsentError(ValueError):
    """Bad input for a user-data operation; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class UnknownUserError(LookupError):
    """The store holds nothing about this user (never known, or already erased)."""


class ErasedUserError(ValueError):
    """A write for an id that was erased: the tombstone keeps it out for good."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


@dataclass(frozen=True)
class ConsentState:
    granted: bool
    source: str  # "default:<regime>" when the user never answered
    since_ms: int | None

    def to_json(self) -> dict:
        return {"granted": self.granted, "source": self.source, "since": iso(self.since_ms)}


def _check_purposes(purposes: Mapping[str, Any]) -> None:
    unknown = sorted(set(purposes) - set(PURPOSES))
    if unknown:
        raise ConsentError(unknown[0], f"unknown consent purpose (one of {', '.join(PURPOSES)})")


def _default_states(store: FeatureStore) -> dict[str, ConsentState]:
    regime = store.consent.regime
    return {p: ConsentState(regime == "opt_out", f"default:{regime}", None) for p in PURPOSES}


# built once: a per-request read must not pay for composing its statement (see features/store.py)
_LEDGER = select(consent_table.c.purpose, consent_table.c.granted, consent_table.c.ts_ms, consent_table.c.source).where(
    consent_table.c.user_id == bindparam("uid")).order_by(consent_table.c.id)
_BLOCKED = select(blocked_table.c.item_id).where(blocked_table.c.user_id == bindparam("uid"))


def _ledger_rows(store: FeatureStore, user_id: str, conn: Any = None) -> list:
    """The user's consent records in ledger order (on `conn` when inside a transaction)."""
    with store.reading(conn) as c:
        return c.execute(_LEDGER, {"uid": str(user_id)}).all()


def current_consents(store: FeatureStore, user_id: str, conn: Any = None) -> dict[str, ConsentState]:
    """The current state of every purpose: the latest ledger record, else the regime's default.
    An erased id has no consent for anything."""
    rows = _ledger_rows(store, user_id, conn)
    states = _default_states(store)
    if not rows and store.is_erased(user_id, conn):
        return {p: ConsentState(False, "erased", None) for p in PURPOSES}
    for r in rows:  # ordered by record: the last one per purpose wins
        if r.purpose in states:
            states[r.purpose] = ConsentState(bool(r.granted), r.source, int(r.ts_ms))
    return states


def consent_history(store: FeatureStore, user_id: str, conn: Any = None) -> list[dict]:
    rows = _ledger_rows(store, user_id, conn)
    return [{"purpose": r.purpose, "granted": bool(r.granted), "at": iso(int(r.ts_ms)), "source": r.source} for r in rows]


def _audit(audit: AuditLog | None, conn: Any, action: str, subject: str, actor: str, detail: dict) -> dict | None:
    """The audit entry of a change, written inside the change's transaction (`conn`); the caller
    hands it to `audit.committed` after the commit (the file sink). None without an audit log."""
    return audit.record(action, subject, actor, detail, conn=conn) if audit is not None else None


def _refuse_erased(store: FeatureStore, user_id: str, conn: Any = None) -> None:
    """Raise ErasedUserError for an erased id. Each write checks twice: first without the write
    lock (a cheap early refusal), then again on its write transaction's connection, because an
    erasure may commit in between and writers run one at a time: only the second check is binding."""
    if store.is_erased(user_id, conn):
        raise ErasedUserError("this user id was erased and cannot be reused")


def record_consent(
    store: FeatureStore, user_id: str, changes: Mapping[str, bool], source: str = "api", *, audit: AuditLog | None = None, actor: str = "cli",
) -> dict[str, ConsentState]:
    """Append one ledger record per purpose in `changes`; returns the new current state.
    `audit`/`actor` (here and below): the entry is written in the change's own transaction."""
    if not changes:
        raise ConsentError("consents", "name at least one purpose")
    _check_purposes(changes)
    if not source or len(source) > 64:
        raise ConsentError("source", "must be 1-64 characters")
    _refuse_erased(store, user_id)
    ts = now_ms()
    rows = [{"user_id": str(user_id), "purpose": p, "granted": bool(g), "ts_ms": ts, "source": source} for p, g in changes.items()]
    with store.transaction() as conn:
        _refuse_erased(store, user_id, conn)
        conn.execute(insert(consent_table), rows)
        store.bump_generation(conn)
        entry = _audit(audit, conn, "consent", store.subject_hash(user_id), actor, {"purposes": {p: bool(g) for p, g in changes.items()}})
    if audit is not None:
        audit.committed(entry)
    return current_consents(store, user_id)


def preferences(store: FeatureStore, user_id: str, conn: Any = None) -> dict:
    """Stated preferences: liked / avoided genres (profile) and blocked items."""

    def read(c: Any) -> dict:
        row = c.execute(select(users_table.c.liked_genres, users_table.c.avoided_genres).where(users_table.c.user_id == str(user_id))).first()
        blocked = list(c.scalars(select(blocked_table.c.item_id).where(blocked_table.c.user_id == str(user_id)).order_by(blocked_table.c.item_id)))
        return {
            "liked_genres": _split_genres(row.liked_genres) if row else [],
            "avoided_genres": _split_genres(row.avoided_genres) if row else [],
            "blocked_items": blocked,
        }

    if conn is not None:
        return read(conn)
    with store.engine.connect() as c:
        return read(c)


def _validate_genres(store: FeatureStore, field: str, names: list[str]) -> list[str]:
    if len(names) > MAX_LIST:
        raise ConsentError(field, f"at most {MAX_LIST} entries")
    catalog = set(store.genre_names())
    for name in names:
        if name not in catalog:
            raise ConsentError(field, f"unknown genre {name!r} (the catalog has: {', '.join(sorted(catalog))})")
    return list(dict.fromkeys(names))


def set_preferences(
    store: FeatureStore,
    user_id: str,
    liked_genres: list[str] | None = None,
    avoided_genres: list[str] | None = None,
    blocked_items: list[str] | None = None,
    *,
    audit: AuditLog | None = None,
    actor: str = "cli",
) -> dict:
    """Replace the given lists (None leaves a list as it is); returns the stored preferences.
    Genres must be in the catalog, blocked items in the items table, and no genre both liked and avoided."""
    _refuse_erased(store, user_id)
    current = preferences(store, user_id)
    liked = current["liked_genres"] if liked_genres is None else _validate_genres(store, "liked_genres", liked_genres)
    avoided = current["avoided_genres"] if avoided_genres is None else _validate_genres(store, "avoided_genres", avoided_genres)
    both = sorted(set(liked) & set(avoided))
    if both:
        raise ConsentError("avoided_genres", f"genre {both[0]!r} is also liked")
    if blocked_items is not None:
        if len(blocked_items) > MAX_LIST:
            raise ConsentError("blocked_items", f"at most {MAX_LIST} entries")
        blocked_items = list(dict.fromkeys(str(i) for i in blocked_items))
        known = store.known_items(blocked_items)
        unknown = [i for i in blocked_items if i not in known]
        if unknown:
            raise ConsentError("blocked_items", f"unknown item id {unknown[0]!r}")
    u = users_table
    with store.transaction() as conn:
        _refuse_erased(store, user_id, conn)
        # stated_ms: the store owns these lists from now on; a dataset import keeps them (FeatureStore.load_dataset)
        values = {"liked_genres": "|".join(liked), "avoided_genres": "|".join(avoided)}
        if liked_genres is not None or avoided_genres is not None:
            values["stated_ms"] = now_ms()
        if conn.execute(update(u).where(u.c.user_id == str(user_id)).values(**values)).rowcount == 0:
            conn.execute(insert(u), [{"user_id": str(user_id), "age": None, "gender": None, "occupation": None, "origin": "api", **values}])
        if blocked_items is not None:
            conn.execute(delete(blocked_table).where(blocked_table.c.user_id == str(user_id)))
            if blocked_items:
                conn.execute(insert(blocked_table), [{"user_id": str(user_id), "item_id": i} for i in blocked_items])
        store.bump_generation(conn)
        stored = (("liked_genres", liked_genres, liked), ("avoided_genres", avoided_genres, avoided), ("blocked_items", blocked_items, blocked_items))
        counts = {f: len(kept) for f, given, kept in stored if given is not None}  # which lists, how long: never the genres or items
        entry = _audit(audit, conn, "preferences", store.subject_hash(user_id), actor, {"replaced": counts})
    if audit is not None:
        audit.committed(entry)
    return preferences(store, user_id)


def record_event(
    store: FeatureStore, user_id: str, item_id: str, rating: float = 1.0, timestamp: int | None = None, *,
    audit: AuditLog | None = None, actor: str = "cli",
) -> dict:
    """Record an interaction. Kept only under personalization or training consent; marked for
    training only under training consent. Returns {"stored", "for_training"}; audited only when stored."""
    if not store.known_items([str(item_id)]):
        raise ConsentError("item_id", f"unknown item id {str(item_id)!r}")
    _refuse_erased(store, user_id)
    with store.transaction() as conn:
        # erasure and consent are read under the write lock: a revocation or an erasure that commits
        # while this call runs is never followed by an event stored under the consent it withdrew
        _refuse_erased(store, user_id, conn)
        consents = current_consents(store, user_id, conn)
        personalization, training = consents["personalization"].granted, consents["training"].granted
        if not (personalization or training):
            return {"stored": False, "for_training": False}
        row = {
            "user_id": str(user_id), "item_id": str(item_id), "rating": float(rating),
            "ts": int(time.time()) if timestamp is None else int(timestamp), "for_training": training,
        }  # fmt: skip
        conn.execute(insert(events_table), [row])
        store.bump_generation(conn)
        entry = _audit(audit, conn, "event", store.subject_hash(user_id), actor, {"for_training": bool(training)})  # no item id
    if audit is not None:
        audit.committed(entry)
    return {"stored": True, "for_training": training}


def export_user(store: FeatureStore, user_id: str, *, audit: AuditLog | None = None, actor: str = "cli") -> dict:
    """Everything the store holds about one user, as JSON-ready data (the right of access).
    Raises UnknownUserError when it holds nothing. Audited (after the read) before it is returned."""
    uid = str(user_id)
    with store.snapshot() as conn:
        if not any(conn.execute(select(t.c.user_id).where(t.c.user_id == uid).limit(1)).first() for t in USER_TABLES):
            raise UnknownUserError("no data held for this user")
        profile = conn.execute(select(users_table).where(users_table.c.user_id == uid)).first()
        i, e = interactions_table, events_table
        interactions = conn.execute(select(i.c.item_id, i.c.rating, i.c.ts).where(i.c.user_id == uid).order_by(i.c.ts, i.c.seq)).all()
        events = conn.execute(select(e.c.item_id, e.c.rating, e.c.ts, e.c.for_training).where(e.c.user_id == uid).order_by(e.c.ts, e.c.id)).all()
        out = {
            "user_id": uid,
            "profile": None if profile is None else {"age": profile.age, "gender": profile.gender, "occupation": profile.occupation},
            "preferences": preferences(store, uid, conn),
            "consents": {
                "regime": store.consent.regime,
                "current": {p: s.to_json() for p, s in current_consents(store, uid, conn).items()},
                "history": consent_history(store, uid, conn),
            },
            "interactions": [{"item_id": r.item_id, "rating": r.rating, "timestamp": int(r.ts)} for r in interactions],
            "events": [{"item_id": r.item_id, "rating": r.rating, "timestamp": int(r.ts), "for_training": bool(r.for_training)} for r in events],
            "exported_at": iso(now_ms()),
        }
    if audit is not None:  # its own transaction: an export changes nothing in the store
        counts = {"interactions": len(out["interactions"]), "events": len(out["events"]), "consent_records": len(out["consents"]["history"])}
        audit.record("export", store.subject_hash(uid), actor, counts)
    return out


def erase_user(store: FeatureStore, user_id: str, *, audit: AuditLog | None = None, actor: str = "cli") -> dict:
    """Delete every row about the user from every table, adjust item popularity, and write a
    tombstone (and the audit entry), all in one transaction; then checkpoint the WAL so the deleted
    rows leave the disk too (secure_delete zeroes them in the database file). Returns the receipt;
    raises UnknownUserError when the store holds nothing about the user (never known, or already erased)."""
    uid = str(user_id)
    subject = store.subject_hash(uid)
    ts = now_ms()
    with store.transaction() as conn:
        i = interactions_table
        per_item = conn.execute(select(i.c.item_id, func.count().label("n")).where(i.c.user_id == uid).group_by(i.c.item_id)).all()
        deleted = {t.name: conn.execute(delete(t).where(t.c.user_id == uid)).rowcount for t in USER_TABLES}
        # the privacy ledger's record of the budget this user spent (keyed by the subject hash): an
        # erased user leaves its future accounting (features/privacy_ledger.py)
        deleted["privacy_spend"] = conn.execute(delete(privacy_spend_table).where(privacy_spend_table.c.subject_hash == subject)).rowcount
        # experiment logs (features/exposures.py) are keyed by the same hash: the lists shown and what followed
        deleted["exposures"] = conn.execute(delete(exposures_table).where(exposures_table.c.subject == subject)).rowcount
        deleted["outcomes"] = conn.execute(delete(outcomes_table).where(outcomes_table.c.subject == subject)).rowcount
        if not any(deleted.values()):
            raise UnknownUserError("no data held for this user")  # rolls back: nothing was deleted
        if per_item:
            p = popularity_table
            conn.execute(
                update(p).where(p.c.item_id == bindparam("item")).values(count=p.c["count"] - bindparam("n")),
                [{"item": r.item_id, "n": r.n} for r in per_item],
            )
        if conn.execute(select(tombstones_table.c.subject_hash).where(tombstones_table.c.subject_hash == subject)).first() is None:
            conn.execute(insert(tombstones_table), [{"subject_hash": subject, "erased_ms": ts}])
        store.record_salt_fingerprint(conn)  # later imports and trainings refuse any other salt
        store.bump_generation(conn)
        entry = _audit(audit, conn, "erasure", subject, actor, {"deleted": deleted, "popularity_adjusted_items": len(per_item)})
    if audit is not None:
        audit.committed(entry)
    store.checkpoint()  # the WAL still holds the pre-erasure pages until checkpointed
    return {
        "erased": True,
        "tombstone": subject,
        "erased_at": iso(ts),
        "deleted": deleted,
        "popularity_adjusted_items": len(per_item),
    }


@dataclass(frozen=True)
class ServingView:
    """What serving must honour for one request."""

    personalization: bool
    demographics: bool
    blocked_items: list[str]
    erased: bool


def serving_view(store: FeatureStore, user_id: str, conn: Any = None) -> ServingView:
    """What serving may use for the user (on `conn` when the caller reads several things at once)."""
    states = current_consents(store, user_id, conn)
    if states["personalization"].source == "erased":
        return ServingView(False, False, [], True)
    with store.reading(conn) as c:
        blocked = list(c.scalars(_BLOCKED, {"uid": str(user_id)}))
    return ServingView(states["personalization"].granted, states["demographics"].granted, blocked, False)


# ---- training export ---------------------------------------------------------------------------
def _latest_consents(conn: Any, store: FeatureStore) -> dict[str, dict[str, bool]]:
    """{user: {purpose: granted}} from the latest ledger record per (user, purpose)."""
    t = consent_table
    out: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in conn.execute(select(t.c.user_id, t.c.purpose, t.c.granted).order_by(t.c.id)):
        out[r.user_id][r.purpose] = bool(r.granted)
    return out


def export_training_data(store: FeatureStore) -> tuple[Dataset, str]:
    """The store's data that may train a model, as a Dataset, and its snapshot hash.

    Only users with `training` consent; their demographics only with `demographics` consent;
    recorded events only when marked for training; erased users never (tombstones are checked
    again here, in case rows came back some other way). Users with no exportable interaction are
    left out. The whole export reads one consistent snapshot of the store."""
    from features.datasets import snapshot_hash

    default = store.consent.regime == "opt_out"
    with store.snapshot() as conn:
        consents = _latest_consents(conn, store)
        item_rows = conn.execute(select(items_table).order_by(items_table.c.item_id)).all()
        profiles = {r.user_id: r for r in conn.execute(select(users_table))}
        i, e = interactions_table, events_table
        rows = [(r.user_id, r.item_id, r.rating, r.ts) for r in conn.execute(select(i.c.user_id, i.c.item_id, i.c.rating, i.c.ts).order_by(i.c.seq))]
        rows += [
            (r.user_id, r.item_id, r.rating, r.ts)
            for r in conn.execute(select(e.c.user_id, e.c.item_id, e.c.rating, e.c.ts).where(e.c.for_training.is_(True)).order_by(e.c.id))
        ]
    genre_names = store.genre_names()

    def granted(user: str, purpose: str) -> bool:
        return consents.get(user, {}).get(purpose, default)

    candidates = sorted({u for u, *_ in rows if granted(u, "training")})
    allowed = set(candidates) - store.tombstoned(candidates)
    item_vocab = Vocab([r.item_id for r in item_rows], kind="item")
    kept = [(u, it, rating, ts) for u, it, rating, ts in rows if u in allowed and it in item_vocab]
    user_vocab = Vocab(sorted({u for u, *_ in kept}), kind="user")
    inter = Interactions(
        user=user_vocab.encode([r[0] for r in kept]),
        item=item_vocab.encode([r[1] for r in kept]),
        rating=np.array([r[2] for r in kept], dtype=np.float32),
        timestamp=np.array([r[3] for r in kept], dtype=np.int64),
    )
    order = np.lexsort((np.arange(len(inter)), inter.timestamp, inter.user))  # time order; events win ties
    inter = inter.take(order).drop_duplicate_pairs()

    genre_index = {g: k for k, g in enumerate(genre_names)}
    to_genres = lambda text: tuple(genre_index[g] for g in _split_genres(text) if g in genre_index)  # noqa: E731
    items = Items(
        title=[r.title for r in item_rows],
        genres=[to_genres(r.genres) for r in item_rows],
        year=np.array([r.year or 0 for r in item_rows], dtype=np.int32),
    )
    age, gender, occupation, liked, avoided = [], [], [], [], []
    for u in user_vocab.ids:
        p = profiles.get(u)
        demo = p is not None and granted(u, "demographics")
        age.append(p.age if demo and p.age is not None else UNKNOWN_AGE)
        gender.append((p.gender or "") if demo else "")
        occupation.append((p.occupation or "") if demo else "")
        liked.append(to_genres(p.liked_genres) if p else ())
        avoided.append(to_genres(p.avoided_genres) if p else ())
    users = Users(np.array(age, dtype=np.int32), gender, occupation, liked, avoided)
    ds = Dataset(f"store:{store.store_id}", inter, items, users, genre_names, user_vocab, item_vocab)
    return ds, snapshot_hash(ds)
