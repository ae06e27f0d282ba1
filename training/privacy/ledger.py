"""Training's side of the privacy-budget ledger (features/privacy_ledger.py): refuse early, record
before release.

A private training checks the budget twice: before it trains (with the epsilon it will spend
where the config fixes it — `privacy.target_epsilon` — else only that the users are not already
past the budget), and again, binding, in the transaction that records the release, just before the
bundle is written, registered or served: an export that fails afterwards leaves an entry for a
model nobody got, which over-counts, never under-counts. The users covered are those whose data
trained the model (a train or validation row), by keyed hash only.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from training.config import TrainConfig

log = logging.getLogger(__name__)


def is_private(cfg: TrainConfig) -> bool:
    return cfg.privacy.mode == "dp" or (cfg.privacy.mode == "federated" and cfg.federated.dp)


def _enabled(cfg: TrainConfig) -> bool:
    return is_private(cfg) and cfg.privacy.ledger


def covered_users(data) -> list[str]:
    """Ids of the users with a train or validation row (`Prepared.seen`, a CSR over all users)."""
    indptr = np.asarray(data.seen[0])
    return data.dataset.user_vocab.decode(np.flatnonzero(np.diff(indptr) > 0))


def _store(cfg: TrainConfig):
    from features.store import FeatureStore

    return FeatureStore(cfg.store.url, consent=cfg.data.store.consent)


def check_before_training(cfg: TrainConfig, data) -> None:
    """Raise features.privacy_ledger.BudgetExceeded (a ValueError: exit 2) before any training."""
    if not _enabled(cfg) or cfg.privacy.total_epsilon is None:
        return
    from features.privacy_ledger import check

    p, fed = cfg.privacy, cfg.federated
    planned = 0.0  # unknown before training (a sigma without a target): the release itself is checked again when recorded
    if p.mode == "dp" and p.target_epsilon:
        planned = p.target_epsilon
    elif p.mode == "federated" and fed.dp and fed.target_epsilon:
        planned = fed.target_epsilon
    store = _store(cfg)
    try:
        before = check(store, covered_users(data), planned, cfg.privacy.total_epsilon)
    finally:
        store.close()
    log.info("privacy budget: these users have spent epsilon %.3g of %.3g; this training plans %.3g", before.epsilon, cfg.privacy.total_epsilon, planned)


def record_release(cfg: TrainConfig, data, privacy: dict[str, Any] | None, snapshot: str, run_id: str | None) -> dict[str, Any] | None:
    """Record the release in the ledger (refusing past the budget); returns the manifest's
    `privacy.ledger` block (entry id, cumulative epsilon/delta of the worst-off covered user), or
    None when nothing private is released or the ledger is off."""
    if not _enabled(cfg) or not privacy or "epsilon" not in privacy:
        return None
    from features.privacy_ledger import record

    mechanism = privacy.get("mechanism") or (  # a fit that names its mechanism (DP-EASE, training/privacy/gram.py) says so
        "dp-sgd (opacus), user-level" if cfg.privacy.mode == "dp" else f"federated client-level dp ({privacy.get('privacy_unit', 'client')})")
    store = _store(cfg)
    try:
        block = record(
            store, covered_users(data), snapshot=snapshot, mechanism=mechanism, accountant=str(privacy.get("accountant", "")),
            epsilon=float(privacy["epsilon"]), delta=float(privacy["delta"]), total=cfg.privacy.total_epsilon, run_id=run_id,
        )  # fmt: skip
    finally:
        store.close()
    log.info("privacy ledger entry %d: cumulative epsilon %.3g, delta %.3g over %d release(s)",
             block["entry"], block["cumulative_epsilon"], block["cumulative_delta"], block["releases"])  # fmt: skip
    return block
