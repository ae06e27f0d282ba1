"""Retrieval task: owns the loss and the evaluation metrics (TF Recommenders style).

Loss: full softmax over the catalog when it is small enough to score every step
(exact, no sampling bias; `loss_weighting` "user" averages each user's hidden items then the
users, "item" averages over every hidden item of the batch, so heavy users weigh more, as in
Mult-VAE's multinomial likelihood); otherwise sampled softmax over in-batch items with the logQ
correction (Yi et al., 2019) so popular items are not over-penalized as negatives.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from training import evaluation
from training.config import TaskConfig
from training.data import CSR, Context, UserBatch, item_features, user_features
from training.model import ITEM_ID, TwoTower


class RetrievalTask:
    def __init__(self, cfg: TaskConfig, item_counts: np.ndarray, item_id_dropout: float = 0.0):
        n_items = len(item_counts)
        self.item_id_dropout = item_id_dropout
        if cfg.loss == "auto":
            self.loss_kind = "full_softmax" if n_items <= cfg.full_softmax_max_items else "sampled_softmax"
        else:
            self.loss_kind = cfg.loss
        self.k = cfg.eval_k
        self.weighting = cfg.loss_weighting
        self.set_item_counts(item_counts)
        self._catalog: tuple | None = None  # catalog_features' cache: (spec, ctx, device, features, item-id span)

    def set_item_counts(self, item_counts: np.ndarray) -> None:
        """The training data's item counts (the refit on train + val calls it again)."""
        self.cold = item_counts == 0  # no training data: served through the OOV id row + content
        q = (item_counts + 1.0) / (item_counts + 1.0).sum()  # +1: never log(0) for unseen items
        self.log_q = torch.from_numpy(np.log(q).astype(np.float32))

    def _id_dropout(self, n: int) -> np.ndarray | None:
        return np.random.random(n) < self.item_id_dropout if self.item_id_dropout > 0 else None

    def catalog_features(self, spec: Any, ctx: Context, device: torch.device) -> KeyedJaggedTensor:
        """The whole catalog's item features for a full-softmax step. Built once per (spec, context,
        device) and kept on the device: a step no longer rebuilds and copies n_items rows of ids,
        genres, years and titles from the host. Item-id dropout is drawn by numpy exactly as before
        (same stream, same runs) and applied on the device: one n_items bool mask crosses per step."""
        oov = self._id_dropout(spec.n_items)
        cache = self._catalog
        if cache is None or cache[0] is not spec or cache[1] is not ctx or cache[2] != device:
            kjt = item_features(spec, ctx, device)
            per_key = kjt.length_per_key()  # host ints, once
            keys = kjt.keys()
            start = sum(per_key[: keys.index(ITEM_ID)])
            cache = self._catalog = (spec, ctx, device, kjt, (start, start + per_key[keys.index(ITEM_ID)]))
        kjt, (lo, hi) = cache[3], cache[4]
        if oov is None:
            return kjt
        values = kjt.values().clone()
        values[lo:hi] = torch.where(torch.from_numpy(oov).to(device), spec.item_oov_index, values[lo:hi])
        return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), offsets=kjt.offsets(), stride=kjt.stride(),
                                 length_per_key=kjt.length_per_key(), offset_per_key=kjt.offset_per_key())  # fmt: skip

    def loss(self, model: TwoTower, batch: UserBatch, ctx: Context) -> torch.Tensor:
        user_vec = model.user_arch(batch.features)
        device = user_vec.device
        indptr, targets = batch.targets
        if self.loss_kind == "full_softmax":
            rows = np.repeat(np.arange(len(batch.users)), np.diff(indptr))
            item_vec = model.item_arch(self.catalog_features(model.spec, ctx, device))
            log_p = F.log_softmax((user_vec @ item_vec.T).float() / model.spec.temperature, dim=1)
            weight = torch.zeros_like(log_p)
            weight[torch.from_numpy(rows).to(device), torch.from_numpy(targets).to(device)] = 1.0
            if self.weighting == "user":
                weight = weight / weight.sum(1, keepdim=True)  # each user counts once, whatever their size
                return -(log_p * weight).sum(1).mean()
            return -(log_p * weight).sum() / weight.sum()  # "item": every hidden item counts once (Mult-VAE)
        # sampled softmax: one hidden item per user; the other users' items are the negatives
        lengths = np.diff(indptr)
        pick = targets[indptr[:-1] + (np.random.random(len(lengths)) * lengths).astype(np.int64)]
        item_vec = model.item_arch(item_features(model.spec, ctx, device, pick, oov=self._id_dropout(len(pick))))
        pick_t = torch.from_numpy(pick).to(device)
        logits = (user_vec @ item_vec.T).float() / model.spec.temperature - self.log_q.to(device)[pick_t][None, :]
        same = pick_t[:, None] == pick_t[None, :]
        logits = logits.masked_fill(same & ~torch.eye(len(pick), dtype=torch.bool, device=device), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(pick), device=device))

    @torch.no_grad()
    def item_embeddings(self, model: TwoTower, ctx: Context, device: torch.device) -> torch.Tensor:
        """The whole catalog; items without training data use the OOV id row (content only)."""
        return model.item_arch(item_features(model.spec, ctx, device, oov=self.cold))

    @torch.no_grad()
    def user_embeddings(self, model: TwoTower, ctx: Context, users: np.ndarray, history: CSR, device: torch.device) -> torch.Tensor:
        return model.user_arch(user_features(model.spec, ctx, users, history, device))

    @torch.no_grad()
    def topk(self, model: TwoTower, ctx: Context, history: CSR, users: np.ndarray, device: torch.device, batch_size: int | None = None) -> np.ndarray:
        """Top-k item indices per user (history items excluded), scored as served. `batch_size` None:
        users per score block sized by the catalog (`blend.block_rows`: ~4M floats, at most 1,024 users),
        so a 200k-item catalog scores 20 users at a time instead of a 1,024 x 200k (819 MB) block."""
        from training.blend import block_rows

        was_training = model.training
        model.eval()
        item_vec = self.item_embeddings(model, ctx, device)
        out = [np.zeros((0, self.k), np.int64)]
        batch_size = batch_size or block_rows(len(item_vec))
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]
            scores = (self.user_embeddings(model, ctx, batch, history, device) @ item_vec.T).float().cpu().numpy()
            out.append(evaluation.topk_from_scores(scores, self.k, exclude=history[:2], exclude_rows=batch))
        model.train(was_training)
        return np.concatenate(out)

    def metrics(self, model: TwoTower, history: CSR, truth: CSR, ctx: Context, device: torch.device, users: np.ndarray | None = None) -> dict[str, float]:
        """Full-ranking metrics: every user with truth items, history items excluded."""
        if users is None:
            users = np.flatnonzero(np.diff(truth[0]) > 0)
        return evaluation.ranking_metrics(self.topk(model, ctx, history, users, device), truth[:2], users, self.k, model.spec.n_items)
