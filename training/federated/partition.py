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
from training.data import CSR, gather_rows


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
    users = np.unique(np.asarray(users, np.int64))
    return expand_rows(len(csr[0]) - 1, users, take_rows(csr, users))


def take_rows(csr: CSR, users: np.ndarray) -> tuple[np.ndarray, ...]:
    """(lengths, indices[, ratings]) of the rows `users` (sorted) only, concatenated: a client's
    compact copy. Gathers those rows alone (no pass over the whole matrix), so 6,040 one-user
    clients of ML-1M are cut in seconds, and each stores a few KB instead of full-height arrays."""
    starts = csr[0][users]
    lengths = csr[0][users + 1] - starts
    pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    return (lengths.astype(np.int64), *(col[pos] for col in csr[1:]))


def expand_rows(n_rows: int, users: np.ndarray, rows: tuple[np.ndarray, ...]) -> CSR:
    """The full-height CSR whose rows `users` (sorted) hold `rows` (from `take_rows`) and every
    other row is empty."""
    counts = np.zeros(n_rows, np.int64)
    counts[users] = rows[0]
    return (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), *rows[1:])


def keep_user_side(side: UserSide, users: np.ndarray) -> UserSide:
    """Side features of `users` only; everybody else reads as 'missing' (0 / no stated genres)."""
    users = np.unique(np.asarray(users, np.int64))
    return _OwnSide.take(side, users).expand(len(side.age), users)


@dataclass(frozen=True)
class _OwnSide:
    """A client's users' side features only (compact: one value or row per own user)."""

    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    liked: tuple[np.ndarray, ...]
    avoided: tuple[np.ndarray, ...]
    gender_vocab: list[str]
    occupation_vocab: list[str]

    @classmethod
    def take(cls, side: UserSide, users: np.ndarray) -> "_OwnSide":
        return cls(side.age[users], side.gender[users], side.occupation[users], take_rows(side.liked, users), take_rows(side.avoided, users),
                   side.gender_vocab, side.occupation_vocab)  # fmt: skip

    def expand(self, n_users: int, users: np.ndarray) -> UserSide:
        def full(values: np.ndarray) -> np.ndarray:
            out = np.zeros(n_users, values.dtype)
            out[users] = values
            return out

        return UserSide(
            age=full(self.age), gender=full(self.gender), occupation=full(self.occupation),
            liked=expand_rows(n_users, users, self.liked), avoided=expand_rows(n_users, users, self.avoided),
            gender_vocab=self.gender_vocab, occupation_vocab=self.occupation_vocab,
        )  # fmt: skip


@dataclass(frozen=True)
class ClientData:
    """What one client holds: its users (row indices, never raw ids) and their data only.

    Stored compactly (its own rows only, a few KB per one-user client); `train`, `val` and
    `user_side` expand them to the full-height arrays the model code indexes by user row, every
    other user's row empty (built per message in microseconds)."""

    users: np.ndarray  # sorted
    n_users: int  # rows of the global user vocabulary
    train_rows: tuple[np.ndarray, ...]  # take_rows of the interactions the client trains on
    val_rows: tuple[np.ndarray, ...]  # its users' validation items (federated evaluation)
    side: _OwnSide

    @classmethod
    def build(cls, users: np.ndarray, train: CSR, val: CSR, side: UserSide) -> "ClientData":
        users = np.unique(np.asarray(users, np.int64))
        return cls(users, len(train[0]) - 1, take_rows(train, users), take_rows(val, users), _OwnSide.take(side, users))

    @property
    def train(self) -> CSR:
        return expand_rows(self.n_users, self.users, self.train_rows)

    @property
    def val(self) -> CSR:
        return expand_rows(self.n_users, self.users, self.val_rows)

    @property
    def user_side(self) -> UserSide:
        return self.side.expand(self.n_users, self.users)


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
