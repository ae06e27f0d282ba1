"""Pieces of training.distributed that need no process group: rank slices, KJT slicing, the
sharding planner's legal choices per device (a CUDA topology is planned, not run: no GPU here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from training import distributed as D
from training.config import ConfigError, DistributedConfig, load_config
from training.data import UserBatch
from training.model import TowerSpec, TwoTower


def test_rank_bounds_split_contiguously_larger_first():
    # 10 users over 3 ranks: 4, 3, 3
    assert [D.rank_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [D.rank_bounds(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    assert D.rank_bounds(5, 0, 1) == (0, 5)


def test_rank_slice_keeps_features_and_targets_of_its_users():
    # 3 users; history lengths 2, 0, 1 (weighted); user ids 1 each
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "user_id"],
        values=torch.tensor([10, 11, 12, 7, 8, 9]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1], dtype=torch.int32),
        weights=torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 1.0]),
    )
    targets = (np.array([0, 1, 3, 4]), np.array([5, 6, 7, 8]))  # user 0: [5], user 1: [6, 7], user 2: [8]
    batch = UserBatch(np.array([4, 2, 9]), kjt, targets)
    first, second = D.rank_slice(batch, 0, 2), D.rank_slice(batch, 1, 2)
    assert first.users.tolist() == [4, 2] and second.users.tolist() == [9]
    assert first.features["history"].values().tolist() == [10, 11]
    assert first.features["history"].lengths().tolist() == [2, 0]
    assert first.features["history"].weights().tolist() == [0.5, 0.5]
    assert first.features["user_id"].values().tolist() == [7, 8]
    assert second.features["history"].values().tolist() == [12] and second.features["user_id"].values().tolist() == [9]
    assert first.targets[0].tolist() == [0, 1, 3] and first.targets[1].tolist() == [5, 6, 7]
    assert second.targets[0].tolist() == [0, 1] and second.targets[1].tolist() == [8]


def model(n_items: int = 60) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(TowerSpec(n_users=50, n_items=n_items, n_genres=5, embedding_dim=8, hidden_dim=16, output_dim=8))


def test_allowed_sharding_types_per_device():
    assert D.allowed_sharding_types(DistributedConfig(), "cpu") == ["data_parallel", "table_wise", "column_wise"]
    assert "row_wise" in D.allowed_sharding_types(DistributedConfig(), "cuda")
    with pytest.raises(ConfigError, match=r"distributed.sharding_types: \['row_wise'\] cannot run on cpu"):
        D.allowed_sharding_types(DistributedConfig(sharding_types=["table_wise", "row_wise"]), "cpu")


def test_planner_picks_cpu_legal_sharding_and_kernels():
    plan = D.plan_summary(D.plan_sharding(model(), 2, "cpu", D.allowed_sharding_types(DistributedConfig(), "cpu")))
    assert set(plan) == {"t_history", "t_item_id", "t_genres"}
    for table, choice in plan.items():
        assert choice["sharding_type"] in ("data_parallel", "table_wise", "column_wise"), table
        assert choice["compute_kernel"] == ("dense" if choice["sharding_type"] == "data_parallel" else "fused"), table
    forced = D.plan_summary(D.plan_sharding(model(), 2, "cpu", ["table_wise"]))
    assert {c["sharding_type"] for c in forced.values()} == {"table_wise"}


def test_planner_on_a_cuda_topology_may_shard_rows():
    # planning only (no GPU needed): row_wise is legal on CUDA and splits a table's rows over the ranks
    plan = D.plan_summary(D.plan_sharding(model(n_items=4000), 2, "cuda", ["row_wise"]))
    assert plan["t_item_id"]["sharding_type"] == "row_wise" and plan["t_item_id"]["ranks"] == [0, 1]


def test_embedding_optimizer_refuses_adam_on_cpu():
    assert D._embedding_optimizer("auto", "cpu")[0] is torch.optim.Adagrad
    assert D._embedding_optimizer("auto", "cuda")[0] is torch.optim.Adam
    with pytest.raises(ConfigError, match="distributed.embedding_optimizer"):
        D._embedding_optimizer("adam", "cpu")


def test_backend_auto_and_nccl_on_cpu():
    assert D.backend_for(DistributedConfig(), torch.device("cpu")) == "gloo"
    assert D.backend_for(DistributedConfig(), torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ConfigError, match="distributed.backend"):
        D.backend_for(DistributedConfig(backend="nccl"), torch.device("cpu"))


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="distributed.shards_path"):
        D.check_config(load_config(None, ["distributed.data=shards"]))
    with pytest.raises(ConfigError, match="trainer.refit"):
        D.check_config(load_config(None, ["trainer.refit=true"]))
    with pytest.raises(ConfigError, match="model.item_bias"):
        D.check_config(load_config(None, ["model.item_bias=true"]))
    with pytest.raises(ConfigError, match="model.year_buckets"):
        D.check_config(load_config(None, ["model.year_buckets=year"]))
    with pytest.raises(ConfigError, match="search.enabled"):
        D.check_config(load_config(None, ["search.enabled=true"]))
    with pytest.raises(ConfigError, match="distributed.launch"):
        load_config(None, ["distributed.launch=torchrun"])  # typo: unknown key


def test_gpu_hosts_get_one_cuda_device_per_local_rank(monkeypatch):
    # mocked CUDA (no GPU here): two visible devices, local rank 1 -> cuda:1; Ray shows one -> cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = load_config(None, [])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.worker_device(cfg) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.worker_device(cfg) == torch.device("cuda", 0)
    assert D.worker_device(load_config(None, ["trainer.device=cpu"])) == torch.device("cpu")
