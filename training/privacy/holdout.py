"""The audit's non-members: a seeded share of users kept out of training, validation and test.

A membership-inference audit needs users the model provably never saw, drawn from the same
population as the members. `prepare` (training/pipeline.py) drops their rows from every split
part when `privacy.audit_holdout > 0`, whatever the privacy mode, so non-private, DP and
federated runs can all be audited the same way; the audit recomputes the same set from the
run's config (no user id is ever written anywhere).
"""
from __future__ import annotations

import numpy as np

from features.splits import Split


def holdout_mask(n_users: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean [n_users]: True for the round(fraction * n_users) held-out users (seeded draw)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"privacy.audit_holdout: must be in [0, 1), got {fraction}")
    mask = np.zeros(n_users, bool)
    mask[np.random.default_rng(seed).permutation(n_users)[: int(round(fraction * n_users))]] = True
    return mask


def without_users(parts: Split, held_out: np.ndarray) -> Split:
    """The split with every row of the held-out users removed (train, val and test)."""
    drop = lambda rows: None if rows is None else rows.take(~held_out[rows.user])  # noqa: E731
    return Split(train=drop(parts.train), val=drop(parts.val), test=drop(parts.test))


def audit_candidates(parts: Split, held_out: np.ndarray) -> Split:
    """The split restricted to the held-out users (what they would have contributed)."""
    return without_users(parts, ~held_out)
