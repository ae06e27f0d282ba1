"""Two-tower retrieval model with embeddings held in TorchRec EmbeddingBagCollections.

Define only (no loss, no data loading): `UserArch` and `ItemArch` each own one
EmbeddingBagCollection and an MLP, and emit L2-normalized vectors; `TwoTower` scores
users against items with cosine / temperature. Feature names double as the KJT keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

HISTORY, USER_ID = "history", "user_id"  # user-side KJT keys
ITEM_ID, GENRES = "item_id", "genres"  # item-side KJT keys


@dataclass(frozen=True)
class TowerSpec:
    """Sizes that define the network (stored in checkpoints and the manifest)."""

    n_users: int
    n_items: int
    n_genres: int
    embedding_dim: int = 64
    hidden_dim: int = 128
    output_dim: int = 64
    use_user_id: bool = True
    use_genres: bool = True
    temperature: float = 0.05

    @property
    def user_oov_index(self) -> int:
        """Row of the user-id table for users the model has not seen (trained via id-dropout)."""
        return self.n_users


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def _table(name: str, rows: int, dim: int, feature: str, pooling: PoolingType) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature], pooling=pooling)


class PooledArch(nn.Module):
    """EmbeddingBagCollection -> concatenated pooled features -> MLP -> unit vector."""

    def __init__(self, tables: list[EmbeddingBagConfig], spec: TowerSpec, device: torch.device | None):
        super().__init__()
        self.feature_names = [t.feature_names[0] for t in tables]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.mlp = mlp(spec.embedding_dim * len(tables), spec.hidden_dim, spec.output_dim)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features)
        x = torch.cat([pooled[name] for name in self.feature_names], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class UserArch(PooledArch):
    """Mean-pooled history bag (+ optional user-id embedding) -> MLP -> unit vector."""

    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        tables = [_table("t_history", spec.n_items, spec.embedding_dim, HISTORY, PoolingType.MEAN)]
        if spec.use_user_id:
            tables.append(_table("t_user_id", spec.n_users + 1, spec.embedding_dim, USER_ID, PoolingType.SUM))
        super().__init__(tables, spec, device)


class ItemArch(PooledArch):
    """Item-id embedding (+ optional mean genre bag) -> MLP -> unit vector."""

    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        tables = [_table("t_item_id", spec.n_items, spec.embedding_dim, ITEM_ID, PoolingType.SUM)]
        if spec.use_genres:
            tables.append(_table("t_genres", max(spec.n_genres, 1), spec.embedding_dim, GENRES, PoolingType.MEAN))
        super().__init__(tables, spec, device)


class TwoTower(nn.Module):
    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        super().__init__()
        self.spec = spec
        self.user_arch = UserArch(spec, device)
        self.item_arch = ItemArch(spec, device)

    def forward(self, user_features: KeyedJaggedTensor, item_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits (B_users, B_items) = cosine / temperature."""
        return self.user_arch(user_features) @ self.item_arch(item_features).T / self.spec.temperature
