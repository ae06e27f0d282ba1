"""Raw id <-> contiguous index, saved next to the model so serving maps ids identically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np


class UnknownIdError(KeyError):
    def __init__(self, kind: str, raw_id: str):
        super().__init__(f"unknown {kind} id {raw_id!r}")
        self.kind, self.raw_id = kind, raw_id


class Vocab:
    """Ordered raw ids (always strings). Index i <-> ids[i]."""

    def __init__(self, ids: Iterable[str], kind: str = "id"):
        self.ids: list[str] = [str(i) for i in ids]
        self.kind = kind
        self._index = {raw: i for i, raw in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError(f"duplicate {kind} ids in vocabulary")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, raw_id: object) -> bool:
        return str(raw_id) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.ids == other.ids and self.kind == other.kind

    def get(self, raw_id: object) -> int | None:
        """Index of raw_id, or None when it is not in the vocabulary."""
        return self._index.get(str(raw_id))

    def index(self, raw_id: object) -> int:
        """Index of raw_id; raises UnknownIdError (a KeyError) when absent."""
        i = self._index.get(str(raw_id))
        if i is None:
            raise UnknownIdError(self.kind, str(raw_id))
        return i

    def encode(self, raw_ids: Sequence[object], unknown: Literal["raise"] | int = "raise") -> np.ndarray:
        """Indices as int64; unknown ids raise, or map to the given sentinel (e.g. -1)."""
        if unknown == "raise":
            return np.fromiter((self.index(r) for r in raw_ids), dtype=np.int64, count=len(raw_ids))
        return np.fromiter((self._index.get(str(r), unknown) for r in raw_ids), dtype=np.int64, count=len(raw_ids))

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.ids[int(i)] for i in indices]

    def to_json(self) -> dict:
        return {"kind": self.kind, "ids": self.ids}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocab":
        return cls(obj["ids"], kind=obj.get("kind", "id"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls.from_json(json.loads(Path(path).read_text()))
