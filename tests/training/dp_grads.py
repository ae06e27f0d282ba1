"""Shared check (not a test module): DP per-sample gradients equal per-user autograd gradients.
Used by test_privacy_dp.py (CPU) and test_cuda.py (CUDA; no MLflow import, for bare GPU hosts)."""
from __future__ import annotations

import numpy as np
import torch
from opacus import GradSampleModule

from training.data import item_features
from training.privacy.dp import DPTwoTower, per_user_loss, user_batch


def assert_per_sample_gradients_are_per_user(cfg, model, ctx, train, device: torch.device, atol: float = 1e-6) -> tuple[DPTwoTower, list]:
    """Opacus' grad_sample for users 3, 7, 11, 19 vs each user's loss backpropagated alone; returns the
    DP twin (grad_sample filled) and the users' bags."""
    batch = user_batch(cfg, model, ctx, train, np.array([3, 7, 11, 19]), np.random.default_rng(0), device)
    dp = DPTwoTower(model)
    pools = dp.item_arch.pools(item_features(model.spec, ctx, device))
    gsm = GradSampleModule(dp, loss_reduction="sum")
    bags = dp.user_bags(batch.features)
    per_user_loss(gsm(bags, pools), batch.targets).sum().backward()
    indptr, items = batch.targets
    for i in range(len(batch.users)):
        alone = DPTwoTower(model)
        one_bags = [(ids[i : i + 1], w[i : i + 1]) for ids, w in bags]
        target = (np.array([0, indptr[i + 1] - indptr[i]]), items[indptr[i] : indptr[i + 1]])
        per_user_loss(alone(one_bags, pools), target).sum().backward()
        for (name, p), (_, q) in zip(dp.named_parameters(), alone.named_parameters()):
            assert p.grad_sample.shape[0] == len(batch.users) and p.grad_sample.device.type == device.type, name
            torch.testing.assert_close(p.grad_sample[i], q.grad, atol=atol, rtol=1e-4, msg=f"{name}, user {i}")
    return dp, bags
