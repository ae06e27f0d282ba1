"""User-level DP-SGD with Opacus: one example = one user, Poisson-sampled, clipped, noised.

The privacy unit is the user: an example is a user's history bag (the visible part) and their
hidden positives (`training.data.epoch_batches` builds it), so one user's whole contribution to
a step is one per-sample gradient, clipped to `privacy.max_grad_norm` before Gaussian noise is
added (Opacus `PrivacyEngine`, RDP or PRV accountant).

Opacus 1.6 computes wrong per-sample gradients for `nn.EmbeddingBag` (per-sample weights are
ignored and repeated ids are counted once), so training runs on `DPTwoTower`, a twin of
`TwoTower` built from plain modules over the very same tables:
- the user tower: `nn.Embedding` + weighted sum over padded bags (= TorchRec's weighted SUM
  pooling, a mean with the bag's weights) -> a copy of `UserArch.mlp`;
- the item tower: every table is pooled once for the whole catalog by a sparse matrix
  (`CatalogBag`) and repeated for each user of the batch, so the per-user gradient of every item
  parameter flows through the full softmax of that user only (a registered grad sampler gives
  Opacus the per-user gradient A^T G_u). All trainable parameters, item side included, are under
  the DP optimizer: the item tower's gradients depend on users' data through the loss.
With `model.item_bias` the bias table is one more CatalogBag (pooled by the item-id pool), so its
per-user gradient is noised like every other item parameter.
After training the weights are copied back into the TwoTower, so export (PlainUserTower -> ONNX,
parity-checked) is the ordinary path.

Ghost clipping (Opacus `grad_sample_mode="ghost"`) is not used: its Linear norm trick costs
B x n_items^2 memory for the catalog-shaped item activations, more than the per-sample gradients
it saves (B x parameters), and its `nn.Embedding` norm sampler ignores bag weights.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchrec import KeyedJaggedTensor, PoolingType
from tqdm.auto import tqdm

from training.config import ConfigError, TrainConfig
from training.data import CSR, Context, UserBatch, csr_from_mask, epoch_batches, item_features
from training.model import ITEM_ID, PooledArch, TwoTower, with_bias_coordinate
from training.trainer import FitResult, lr_at, seed_everything

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs
def _bag_coords(kjt: KeyedJaggedTensor, key: str, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(row, position-in-bag, id, weight) of every value of `key`, and the number of bags.
    Weights: the KJT's own (weighted SUM pooling), 1 (SUM) or 1/len (MEAN)."""
    jt = kjt[key]
    values, lengths = jt.values(), jt.lengths().long()
    rows = len(lengths)
    row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(len(values), device=values.device) - starts[row]
    weights = jt.weights_or_none()
    if weights is None:
        weights = (1.0 / lengths.clamp(min=1).float())[row] if mean else torch.ones(len(values), device=values.device)
    return row, col, values, weights.float(), rows


def padded_bags(kjt: KeyedJaggedTensor, key: str, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] and weights [B, L] (padding: id 0 with weight 0) of one KJT key."""
    row, col, values, weights, rows = _bag_coords(kjt, key, mean)
    width = max(int(col.max()) + 1 if len(col) else 0, 1)
    ids = torch.zeros(rows, width, dtype=torch.long, device=values.device)
    w = torch.zeros(rows, width, device=values.device)
    ids[row, col], w[row, col] = values, weights
    return ids, w


def pool_matrix(kjt: KeyedJaggedTensor, key: str, n_rows: int, mean: bool) -> torch.Tensor:
    """Sparse [bags, n_rows] matrix A with A @ table = the pooled bags of one KJT key."""
    row, _, values, weights, rows = _bag_coords(kjt, key, mean)
    return torch.sparse_coo_tensor(torch.stack([row, values]), weights, (rows, n_rows), check_invariants=False).coalesce()


# --------------------------------------------------------------------------- the DP twin
def _tables(arch: PooledArch) -> dict[str, tuple[torch.Tensor, bool]]:
    """feature -> (the EBC table's weight, mean pooling?)"""
    configs = {c.feature_names[0]: c for c in arch.ebc.embedding_bag_configs()}
    return {f: (arch.ebc.embedding_bags[f"t_{f}"].weight, configs[f].pooling == PoolingType.MEAN) for f in arch.feature_names}


class UserTowerDP(nn.Module):
    """`UserArch` on plain `nn.Embedding`s: weighted sum over padded bags -> MLP -> unit vector."""

    def __init__(self, arch: PooledArch):
        super().__init__()
        self.feature_names = list(arch.feature_names)
        self.tables = nn.ModuleDict({f: nn.Embedding.from_pretrained(w.detach().clone().float(), freeze=False) for f, (w, _) in _tables(arch).items()})
        self.mlp = copy.deepcopy(arch.mlp).float()
        self.item_bias = arch.item_bias

    def forward(self, bags: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        pooled = [(self.tables[f](ids) * w.unsqueeze(-1)).sum(1) for f, (ids, w) in zip(self.feature_names, bags)]
        vectors = F.normalize(self.mlp(torch.cat(pooled, dim=1)), dim=-1)
        return with_bias_coordinate(vectors, vectors.new_ones(1)) if self.item_bias else vectors


class CatalogBag(nn.Module):
    """One item-side table pooled for the whole catalog (A @ weight) and repeated for each of the
    B users of the batch: [B, n_items, d]. The last input only carries B for Opacus."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())

    def forward(self, pool: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(pool, self.weight).unsqueeze(0).expand(batch.shape[0], -1, -1)


@register_grad_sampler(CatalogBag)
def _catalog_bag_grad_sample(layer: CatalogBag, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-user gradient of the table: A^T G_u, for all users of the batch in one sparse product."""
    pool = activations[0]
    users, n_items, dim = backprops.shape
    grads = torch.sparse.mm(pool.t(), backprops.permute(1, 0, 2).reshape(n_items, users * dim))
    return {layer.weight: grads.reshape(-1, users, dim).permute(1, 0, 2).contiguous()}


class ItemTowerDP(nn.Module):
    """`ItemArch` as catalog-wide pooled tables (one copy per user) -> MLP -> unit vectors [B, n_items, D]."""

    def __init__(self, arch: PooledArch):
        super().__init__()
        tables = _tables(arch)
        self.feature_names = list(arch.feature_names)
        self.mean = {f: mean for f, (_, mean) in tables.items()}
        self.tables = nn.ModuleDict({f: CatalogBag(w) for f, (w, _) in tables.items()})
        self.mlp = copy.deepcopy(arch.mlp).float()
        # model.item_bias: the [n_items + 1, 1] bias table pooled by the item-id pool (one id per item)
        self.bias = CatalogBag(arch.bias) if arch.bias is not None else None

    def pools(self, kjt: KeyedJaggedTensor) -> list[torch.Tensor]:
        return [pool_matrix(kjt, f, self.tables[f].weight.shape[0], self.mean[f]) for f in self.feature_names]

    def forward(self, pools: list[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        pooled = [self.tables[f](a, batch) for f, a in zip(self.feature_names, pools)]
        vectors = F.normalize(self.mlp(torch.cat(pooled, dim=-1)), dim=-1)
        if self.bias is None:
            return vectors
        return torch.cat([vectors, self.bias(pools[self.feature_names.index(ITEM_ID)], batch)], dim=-1)


class DPTwoTower(nn.Module):
    """`TwoTower` rebuilt for per-user gradients; logits [B, n_items] = cosine / temperature."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.temperature = model.spec.temperature
        self.user_arch = UserTowerDP(model.user_arch)
        self.item_arch = ItemTowerDP(model.item_arch)

    def user_bags(self, kjt: KeyedJaggedTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [padded_bags(kjt, f) for f in self.user_arch.feature_names]

    def forward(self, user_bags: list[tuple[torch.Tensor, torch.Tensor]], item_pools: list[torch.Tensor]) -> torch.Tensor:
        user = self.user_arch(user_bags)
        item = self.item_arch(item_pools, user.new_zeros(user.shape[0], 1))
        return torch.einsum("bd,bnd->bn", user, item) / self.temperature

    @torch.no_grad()
    def copy_to(self, model: TwoTower) -> None:
        """Write the trained weights back into the TorchRec TwoTower (export reads them there)."""
        for mine, arch in ((self.user_arch, model.user_arch), (self.item_arch, model.item_arch)):
            for f in mine.feature_names:
                target = arch.ebc.embedding_bags[f"t_{f}"].weight
                target.copy_(mine.tables[f].weight.to(target.dtype))
            arch.mlp.load_state_dict(mine.mlp.state_dict())
        if self.item_arch.bias is not None:
            model.item_arch.bias.copy_(self.item_arch.bias.weight.to(model.item_arch.bias.dtype))


def per_user_loss(logits: torch.Tensor, targets: CSR) -> torch.Tensor:
    """[B] multinomial log-likelihood loss of each user's hidden items over the catalog (the
    RetrievalTask full-softmax loss, before its mean over users)."""
    indptr, items = targets[0], targets[1]
    log_p = F.log_softmax(logits.float(), dim=1)
    rows = torch.from_numpy(np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))).to(logits.device)
    weight = torch.zeros_like(log_p)
    weight[rows, torch.from_numpy(np.asarray(items)).to(logits.device)] = 1.0
    weight = weight / weight.sum(1, keepdim=True).clamp(min=1.0)
    return -(log_p * weight).sum(1)


# --------------------------------------------------------------------------- training
def check_supported(cfg: TrainConfig, loss_kind: str) -> None:
    if cfg.model.use_user_id:
        raise ConfigError("model.use_user_id: must be false with privacy.mode=dp (a per-user embedding row memorizes its user; the user tower must be a function of history and features)")
    if cfg.task.loss_weighting != "user":
        raise ConfigError("task.loss_weighting: privacy.mode=dp needs 'user' (each user's loss stands alone; 'item' divides by the whole batch's item count, mixing users)")
    if loss_kind != "full_softmax":
        raise ConfigError("task.loss: privacy.mode=dp needs full_softmax (sampled softmax uses other users' items as negatives, so one user's data would reach other users' clipped gradients)")


def user_batch(cfg: TrainConfig, model: TwoTower, ctx: Context, train: CSR, users: np.ndarray, rng: np.random.Generator, device: torch.device) -> UserBatch:
    """The sampled users as one training batch: a fresh random share of each user's items hidden
    (history dropout, side-feature dropout) exactly as the ordinary trainer's epoch does."""
    n_users = len(train[0]) - 1
    chosen = np.zeros(n_users, bool)
    chosen[users] = True
    rows = np.repeat(np.arange(n_users), np.diff(train[0]))
    sub = csr_from_mask(train, chosen[rows])
    m = cfg.model
    return next(epoch_batches(model.spec, ctx, sub, len(users), cfg.task.history_dropout, 0.0, rng, device, m.demographics_dropout, m.stated_dropout))


def _noise_only_step(optimizer) -> None:
    """An empty Poisson batch still releases a step (noise only), as the accountant assumes."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def fit_dp(cfg: TrainConfig, model: TwoTower, task, data, ctx: Context, device: torch.device, tracker) -> FitResult:
    """Train `model` in place with user-level DP-SGD; returns the FitResult with its guarantee."""
    check_supported(cfg, task.loss_kind)
    started = time.perf_counter()
    rng = seed_everything(cfg.trainer.seed)
    p, t = cfg.privacy, cfg.trainer
    members = np.flatnonzero(np.diff(data.train[0]) > 0)
    n = len(members)
    if n == 0:
        raise ConfigError("privacy.mode: dp needs at least one training user")
    delta = p.delta if p.delta is not None else 1.0 / n
    dp_model = DPTwoTower(model).to(device).train()
    optimizer = torch.optim.Adam(dp_model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loader = DataLoader(TensorDataset(torch.from_numpy(members)), batch_size=min(t.batch_size, n))
    engine = PrivacyEngine(accountant=p.accountant)
    common = dict(module=dp_model, optimizer=optimizer, data_loader=loader, max_grad_norm=p.max_grad_norm, poisson_sampling=True, loss_reduction="mean")
    if p.noise_multiplier is None:
        gsm, dp_opt, dp_loader = engine.make_private_with_epsilon(target_epsilon=p.target_epsilon, target_delta=delta, epochs=t.epochs, **common)
    else:
        gsm, dp_opt, dp_loader = engine.make_private(noise_multiplier=p.noise_multiplier, **common)
    sample_rate = 1.0 / len(dp_loader)
    log.info("DP-SGD: %d users, sample rate %.4f (~%d users/step), sigma %.4f, C %.3g, delta %.3g, %s accountant",
             n, sample_rate, round(n * sample_rate), dp_opt.noise_multiplier, p.max_grad_norm, delta, p.accountant)  # fmt: skip

    # Opacus' hooks on the input-side modules (whose inputs need no grad) trip this harmless torch warning
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
    history: list[dict[str, float]] = []
    steps, monitor, last = 0, f"val/ndcg@{task.k}", float("nan")
    for epoch in range(1, t.epochs + 1):
        for group in dp_opt.param_groups:  # trainer.lr_schedule, as the ordinary trainer applies it (a public schedule: no privacy cost)
            group["lr"] = lr_at(t.lr, t.lr_schedule, epoch, t.epochs)
        total, count = 0.0, 0
        bar = tqdm(dp_loader, desc=f"dp epoch {epoch}/{t.epochs}", disable=not t.progress, leave=False)
        for (batch_users,) in bar:
            dp_opt.zero_grad(set_to_none=True)
            steps += 1
            users = batch_users.numpy()
            if len(users) == 0:
                _noise_only_step(dp_opt)
                continue
            batch = user_batch(cfg, model, ctx, data.train, users, rng, device)
            pools = dp_model.item_arch.pools(item_features(model.spec, ctx, device, oov=task._id_dropout(model.spec.n_items)))
            loss = per_user_loss(gsm(dp_model.user_bags(batch.features), pools), batch.targets).mean()
            loss.backward()
            dp_opt.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.4f}")
        dp_model.copy_to(model)
        # validation only reports: the released model is the last one, whatever these say
        metrics = {"train/loss": total / max(count, 1), "privacy/epsilon_spent": engine.get_epsilon(delta)}
        metrics.update({f"val/{k}": v for k, v in task.metrics(model, data.train, data.val, ctx, device).items()})
        last = metrics[monitor]
        history.append({"epoch": epoch, **metrics})
        log.info("dp epoch %d %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        tracker.log_metrics(metrics, step=epoch)

    dp_model.copy_to(model)
    privacy = guarantee(cfg, engine.get_epsilon(delta), delta, dp_opt.noise_multiplier, sample_rate, steps, n)
    log_guarantee(tracker, privacy)
    return FitResult(t.epochs, last, t.epochs, history, time.perf_counter() - started, privacy)


def guarantee(cfg: TrainConfig, epsilon: float, delta: float, sigma: float, sample_rate: float, steps: int, n_users: int) -> dict[str, Any]:
    """What the manifest and MLflow record about the run's (epsilon, delta) guarantee."""
    p = cfg.privacy
    return {
        "mode": "dp",
        "unit": "user",
        "epsilon": float(epsilon),
        "delta": float(delta),
        "accountant": p.accountant,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": float(sigma),
        "max_grad_norm": p.max_grad_norm,
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "epochs": cfg.trainer.epochs,
        "training_users": int(n_users),
        "sampling": "poisson",
        "clipping": "flat, per user",
    }


def log_guarantee(tracker, privacy: dict[str, Any]) -> None:
    numbers = {f"privacy/{k}": float(privacy[k]) for k in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps")}
    tracker.log_metrics(numbers)
    if tracker.enabled:
        tracker.set_tags({"privacy.mode": "dp", "privacy.unit": "user", "privacy.accountant": privacy["accountant"],
                                 "privacy.epsilon": f"{privacy['epsilon']:.3f}", "privacy.delta": f"{privacy['delta']:.3g}"})  # fmt: skip
