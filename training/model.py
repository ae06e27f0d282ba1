"""Two-tower retrieval model with embeddings held in TorchRec EmbeddingBagCollections.

Define only (no loss, no data loading): `UserArch` and `ItemArch` each own one
EmbeddingBagCollection and an MLP, and emit L2-normalized vectors; `TwoTower` scores
users against items with cosine / temperature. Feature names double as the KJT keys.

`two_tower` and `hybrid` are one code path: the spec's flags add tables.
- User side (a weighted KJT): history bag (SUM over per-user normalized weights = a mean,
  rating-weighted when asked), optional user id, demographics (age bucket, gender, occupation;
  row 0 = missing), stated liked / avoided genres (mean bags).
- Item side: item id (last row = OOV: trained by id-dropout, used for never-seen items),
  genres, release-decade bucket, hashed title tokens (mean bags).

"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

HISTORY, USER_ID, AGE, GENDER, OCCUPATION, LIKED, AVOIDED = "history", "user_id", "age", "gender", "occupation", "liked", "avoided"
ITEM_ID, GENRES, YEAR, TITLE = "item_id", "genres", "year", "title"
USER_KEYS = (HISTORY, USER_ID, AGE, GENDER, OCCUPATION, LIKED, AVOIDED)


@dataclass(frozen=True)
class TowerSpec:
    """Sizes and switches that define the network (stored in checkpoints and the manifest)."""

    n_users: int
    n_items: int
    n_genres: int
    embedding_dim: int = 64
    hidden_dim: int = 128
    output_dim: int = 64
    hidden_layers: int = 1  # ReLU layers of width hidden_dim in each tower's MLP; 0 = one linear map
    use_user_id: bool = False
    use_genres: bool = True
    temperature: float = 0.05
    # hybrid switches (all off = the ids-only two-tower)
    use_content: bool = False  # item release decade + hashed title tokens
    use_title: bool = True  # with use_content: the title-token bag (off: decade only)
    use_demographics: bool = False
    use_stated: bool = False  # stated liked / avoided genres
    n_age: int = 8  # rows incl. the missing row 0
    n_gender: int = 1
    n_occupation: int = 1
    n_year: int = 12
    n_title: int = 1
    # a learned per-item logit bias (a popularity prior the towers need not spend directions on),
    # folded into the vectors so serving's user @ items.T still ranks exactly: the user vector gets
    # one more coordinate, a constant 1, the item vector the item's bias b (logit = (cos + b) / T)
    item_bias: bool = False

    @property
    def vector_dim(self) -> int:
        """Width of the user and item vectors: output_dim, + 1 with item_bias."""
        return self.output_dim + int(self.item_bias)

    @property
    def user_oov_index(self) -> int:
        """Row of the user-id table for users the model has not seen (trained via id-dropout)."""
        return self.n_users

    @property
    def item_oov_index(self) -> int:
        """Row of the item-id table for items without training data: content carries them."""
        return self.n_items

    def user_features(self) -> list[str]:
        keys = [HISTORY]
        keys += [USER_ID] if self.use_user_id else []
        keys += [AGE, GENDER, OCCUPATION] if self.use_demographics else []
        keys += [LIKED, AVOIDED] if self.use_stated else []
        return keys

    def item_features(self) -> list[str]:
        content = ([YEAR] + ([TITLE] if self.use_title else [])) if self.use_content else []
        return [ITEM_ID] + ([GENRES] if self.use_genres else []) + content


def mlp(in_dim: int, hidden_dim: int, out_dim: int, hidden_layers: int = 1) -> nn.Sequential:
    """`hidden_layers` x (Linear -> ReLU) of width hidden_dim, then Linear to out_dim (0: one Linear)."""
    layers: list[nn.Module] = []
    for i in range(hidden_layers):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden_dim if hidden_layers else in_dim, out_dim))


def _table(feature: str, rows: int, dim: int, pooling: PoolingType) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=dim, num_embeddings=max(rows, 1), feature_names=[feature], pooling=pooling)


class PooledArch(nn.Module):
    """EmbeddingBagCollection -> concatenated pooled features -> MLP -> unit vector."""

    def __init__(self, tables: list[EmbeddingBagConfig], spec: TowerSpec, device: torch.device | None, weighted: bool = False):
        super().__init__()
        self.feature_names = [t.feature_names[0] for t in tables]
        self.ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=device)
        self.mlp = mlp(spec.embedding_dim * len(tables), spec.hidden_dim, spec.output_dim, spec.hidden_layers).to(device)  # with the tables (CUDA runs)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features)
        x = torch.cat([pooled[name] for name in self.feature_names], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


def with_bias_coordinate(vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[..., D] vectors with one more coordinate appended (item_bias: 1 for users, b for items)."""
    return torch.cat([vectors, bias.to(vectors.dtype).expand(*vectors.shape[:-1], 1)], dim=-1)


class UserArch(PooledArch):
    """History bag (+ user id, demographics, stated genres) -> MLP -> unit vector (item_bias: then a 1)."""

    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        rows = {HISTORY: spec.n_items, USER_ID: spec.n_users + 1, AGE: spec.n_age, GENDER: spec.n_gender,
                OCCUPATION: spec.n_occupation, LIKED: spec.n_genres, AVOIDED: spec.n_genres}  # fmt: skip
        # a weighted EBC pools by SUM only: bags arrive with weights summing to 1 per user (history:
        # plain or rating-weighted mean; stated genres: 1/len), so every SUM here is a mean
        tables = [_table(f, rows[f], spec.embedding_dim, PoolingType.SUM) for f in spec.user_features()]
        super().__init__(tables, spec, device, weighted=True)
        self.item_bias = spec.item_bias

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        vectors = super().forward(features)
        return with_bias_coordinate(vectors, vectors.new_ones(1)) if self.item_bias else vectors


class ItemArch(PooledArch):
    """Item id (+ genre, decade and title-token bags) -> MLP -> unit vector (item_bias: then the
    item's bias, one row per item id, the OOV row included)."""

    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        rows = {ITEM_ID: spec.n_items + 1, GENRES: spec.n_genres, YEAR: spec.n_year, TITLE: spec.n_title}
        tables = [_table(f, rows[f], spec.embedding_dim, PoolingType.SUM if f in (ITEM_ID, YEAR) else PoolingType.MEAN) for f in spec.item_features()]
        super().__init__(tables, spec, device)
        self.bias = nn.Parameter(torch.zeros(spec.n_items + 1, 1, device=device)) if spec.item_bias else None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        vectors = super().forward(features)
        if self.bias is None:
            return vectors
        return with_bias_coordinate(vectors, self.bias[features[ITEM_ID].values()])  # one id per item row


class TwoTower(nn.Module):
    def __init__(self, spec: TowerSpec, device: torch.device | None = None):
        super().__init__()
        self.spec = spec
        self.user_arch = UserArch(spec, device)
        self.item_arch = ItemArch(spec, device)

    def forward(self, user_features: KeyedJaggedTensor, item_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits (B_users, B_items) = cosine / temperature (item_bias: (cosine + b) / temperature)."""
        return self.user_arch(user_features) @ self.item_arch(item_features).T / self.spec.temperature
