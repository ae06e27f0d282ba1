"""Which users each federated client holds, and the data a client keeps to itself.

A client's data holds only its own users' rows: train/val interactions and side features
(demographics, stated genres) of every other user are blank, so nothing of another user can leak
through a client even by mistake. The item catalog (ids, genres, titles) is public and shared.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.content import UserSide
from training.config import ConfigError
from training.data import CSR, csr_from_mask


def partition_users(users: np.ndarray, scheme: str, n_silos: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Split user indices into clients: `user` = one client per user (in the given order);
    `silos` = a seeded shuffle cut into `n_silos` near-equal parts (sizes differ by at most one,
    the first ones larger), each sorted."""
    users = np.asarray(users, np.int64)
    if scheme == "user":
        return [users[i : i + 1] for i in range(len(users))]
    if scheme != "silos":
        raise ConfigError(f"federated.partition: unknown scheme {scheme!r} (silos or user)")
    if n_silos > len(users):
        raise ConfigError(f"federated.n_silos: {n_silos} silos but only {len(users)} users with training data")
    shuffled = np.random.default_rng(seed).permutation(users)
    return [np.sort(part) for part in np.array_split(shuffled, n_silos)]


def keep_rows(csr: CSR, users: np.ndarray) -> CSR:
    """The same-height CSR with only the rows of `users` filled (all other rows empty)."""
    rows = np.repeat(np.arange(len(csr[0]) - 1), np.diff(csr[0]))
    return csr_from_mask(csr, np.isin(rows, users))


def keep_user_side(side: UserSide, users: np.ndarray) -> UserSide:
    """Side features of `users` only; everybody else reads as 'missing' (0 / no stated genres)."""
    mine = np.zeros(len(side.age), bool)
    mine[users] = True
    return UserSide(
        age=np.where(mine, side.age, 0),
        gender=np.where(mine, side.gender, 0),
        occupation=np.where(mine, side.occupation, 0),
        liked=keep_rows(side.liked, users),
        avoided=keep_rows(side.avoided, users),
        gender_vocab=side.gender_vocab,
        occupation_vocab=side.occupation_vocab,
    )


@dataclass(frozen=True)
class ClientData:
    """What one client holds: its users (row indices, never raw ids) and their data only."""

    users: np.ndarray
    train: CSR  # interactions the client trains on
    val: CSR  # its users' validation items (federated evaluation)
    user_side: UserSide

    @classmethod
    def build(cls, users: np.ndarray, train: CSR, val: CSR, side: UserSide) -> "ClientData":
        return cls(np.asarray(users, np.int64), keep_rows(train, users), keep_rows(val, users), keep_user_side(side, users))


def write_client_store(root: str | Path, parts: list[ClientData]) -> Path:
    """One file per client: its 'device storage' (`client-<partition id>.pkl`), written atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for pid, part in enumerate(parts):
        tmp = root / f".client-{pid}.pkl.tmp"
        tmp.write_bytes(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(root / f"client-{pid}.pkl")
    return root


def read_client_data(root: str | Path, partition_id: int) -> ClientData:
    return pickle.loads((Path(root) / f"client-{partition_id}.pkl").read_bytes())
