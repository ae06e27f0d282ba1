"""The privacy-budget ledger: what every private model released from the store's users has spent.

Each private training records one entry (time, training-data snapshot hash, mechanism, accountant,
epsilon, delta, users covered, MLflow run) and, per user it covered, one `privacy_spend` row keyed
by the user's subject hash (`FeatureStore.subject_hash`, an HMAC under the erasure salt: never the
id). A user's spent budget is the composition of the entries that covered them; the ledger's
cumulative figure is that of the user who spent the most.

Composition is basic sequential composition: k releases that are (eps_i, delta_i)-DP with respect
to one user are (sum eps_i, sum delta_i)-DP together (Dwork & Roth 2014, Thm 3.16), whatever each
release's mechanism. It is an upper bound: composing the releases' RDP curves would be tighter for
many retrains, but needs each mechanism's curve, not only its (eps, delta).

A training that would take any covered user past the configured total (`privacy.total_epsilon`) is
refused before anything is released (`BudgetExceeded`, exit 2 in the CLI). The check and the record
run in one write transaction, so two trainings started together cannot both pass on the same
budget. Erasure deletes the user's `privacy_spend` rows (features/consent.py: `erase_user`): an
erased user leaves the ledger's future accounting; the entries themselves (counts, no ids) stay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import func, insert, select

from features.consent import now_ms
from features.store import _IN_CHUNK, FeatureStore, privacy_ledger_table, privacy_spend_table

BUDGET_KEY = "privacy.total_epsilon"
COMPOSITION = "basic (sum of epsilon and of delta over the releases covering a user)"


class BudgetExceeded(ValueError):
    """A private training would take covered users past the configured total epsilon."""


@dataclass(frozen=True)
class Spend:
    """The composed budget of the user who spent the most (0 when nobody spent anything)."""

    epsilon: float = 0.0
    delta: float = 0.0
    releases: int = 0  # releases that covered that user

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "releases": self.releases}


def _worst(conn: Any, hashes: list[str] | None) -> Spend:
    """Max over users (all of them, or those with these hashes) of their composed spend."""
    s, led = privacy_spend_table, privacy_ledger_table
    per_user = (
        select(s.c.subject_hash, func.sum(led.c.epsilon).label("eps"), func.sum(led.c.delta).label("delta"), func.count().label("n"))
        .select_from(s.join(led, s.c.entry_id == led.c.id))
        .group_by(s.c.subject_hash)
    )
    best = Spend()
    parts = [None] if hashes is None else [hashes[lo : lo + _IN_CHUNK] for lo in range(0, len(hashes), _IN_CHUNK)]
    for part in parts:
        query = per_user if part is None else per_user.where(s.c.subject_hash.in_(part))
        for row in conn.execute(query):
            if (row.eps, row.delta) > (best.epsilon, best.delta):
                best = Spend(float(row.eps), float(row.delta), int(row.n))
    return best


def spent(store: FeatureStore, user_ids: Iterable[str] | None = None) -> Spend:
    """The composed spend of the worst-off user among `user_ids` (None: among everyone in the ledger)."""
    hashes = None if user_ids is None else sorted({store.subject_hash(u) for u in user_ids})
    with store.snapshot() as conn:
        return _worst(conn, hashes)


def _refusal(before: Spend, epsilon: float, total: float) -> str:
    return (
        f"{BUDGET_KEY}: this training would spend epsilon {epsilon:g} on users who have already spent epsilon "
        f"{before.epsilon:g} over {before.releases} earlier private release(s); {before.epsilon + epsilon:g} > the total "
        f"budget {total:g}. Nothing was released. Raise {BUDGET_KEY}, lower privacy.target_epsilon, or train on other users"
    )


def check(store: FeatureStore, user_ids: Iterable[str], epsilon: float, total: float | None) -> Spend:
    """Raise BudgetExceeded when spending `epsilon` more would take a user among `user_ids` past
    `total` (None: no limit). Returns what they had spent before. A read only: `record` checks again."""
    before = spent(store, user_ids)
    if total is not None and before.epsilon + epsilon > total + 1e-12:
        raise BudgetExceeded(_refusal(before, epsilon, total))
    return before


def record(
    store: FeatureStore, user_ids: Iterable[str], *, snapshot: str, mechanism: str, accountant: str, epsilon: float, delta: float,
    total: float | None = None, run_id: str | None = None,
) -> dict[str, Any]:
    """Check the budget and record one release covering `user_ids`, in one write transaction.
    Returns the entry's id and the covered users' composed spend after it (the model card's figure)."""
    hashes = sorted({store.subject_hash(u) for u in user_ids})
    with store.transaction() as conn:
        # the entries are keyed by hashes under this salt: pin it, as tombstones do, so that a later run under
        # another salt is refused instead of seeing new users with nothing spent (the budget silently reset)
        store.record_salt_fingerprint(conn)
        before = _worst(conn, hashes)
        if total is not None and before.epsilon + epsilon > total + 1e-12:
            raise BudgetExceeded(_refusal(before, epsilon, total))
        row = {"ts_ms": now_ms(), "snapshot": snapshot, "mechanism": mechanism, "accountant": accountant,
               "epsilon": float(epsilon), "delta": float(delta), "users": len(hashes), "run_id": run_id}  # fmt: skip
        entry = conn.execute(insert(privacy_ledger_table).values(**row).returning(privacy_ledger_table.c.id)).scalar_one()
        for lo in range(0, len(hashes), 10_000):
            conn.execute(insert(privacy_spend_table), [{"entry_id": entry, "subject_hash": h} for h in hashes[lo : lo + 10_000]])
        after = _worst(conn, hashes)
    return {"entry": int(entry), "cumulative_epsilon": after.epsilon, "cumulative_delta": after.delta, "releases": after.releases,
            "budget_epsilon": total, "composition": COMPOSITION}  # fmt: skip


def entries(store: FeatureStore) -> list[dict[str, Any]]:
    """Every release, oldest first, with how many users it still covers (erased ones leave)."""
    led, s = privacy_ledger_table, privacy_spend_table
    covering = select(s.c.entry_id, func.count().label("n")).group_by(s.c.entry_id).subquery()
    query = (
        select(led, func.coalesce(covering.c.n, 0).label("still_covered"))
        .select_from(led.outerjoin(covering, covering.c.entry_id == led.c.id))
        .order_by(led.c.id)
    )
    with store.snapshot() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
