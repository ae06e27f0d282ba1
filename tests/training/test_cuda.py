"""CUDA paths, run for real on a GPU (skipped without one: CI and cpu-2c have none).

`scripts/gpu_check.sh` runs this file on a lent GPU machine. What it checks: the towers compute
the same vectors on CUDA as on the CPU for the same weights; a CUDA run with bf16 autocast
trains to the CPU run's quality and exports a bundle whose ONNX tower matches it; DP-SGD's
per-sample gradients on CUDA are the per-user gradients, and a private CUDA run spends the
epsilon a CPU run spends.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.training.dp_grads import assert_per_sample_gradients_are_per_user
from training.config import load_config
from training.data import item_features, user_features
from training.pipeline import build_model, context, item_counts, prepare, train
from training.task import RetrievalTask
from training.trainer import seed_everything

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL = ["data.synthetic.n_users=600", "data.synthetic.n_items=300", "trainer.epochs=12", "tracking.enabled=false", "store.load=false", "trainer.progress=false"]
HYBRID = ["model.use_content=true", "model.use_demographics=true", "model.use_stated=true", "model.rating_weighted=true", "model.title_buckets=32"]


def overrides(tmp_path, device: str, extra=()) -> list[str]:
    return [*SMALL, f"trainer.device={device}", f"export.output_dir={tmp_path}/{device}/bundle", f"trainer.checkpoint_dir={tmp_path}/{device}/ckpt", *extra]


def built(tmp_path, extra=()):
    cfg = load_config(REPO / "configs" / "two_tower.yaml", overrides(tmp_path, "cpu", extra))
    seed_everything(0)
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    return cfg, data, ctx, build_model(cfg, data.dataset, ctx, CPU)


@pytest.mark.parametrize("extra", [[], HYBRID + ["model.item_bias=true"]], ids=["two_tower", "hybrid"])
def test_towers_compute_the_same_vectors_on_cuda(tmp_path, extra):
    cfg, data, ctx, model = built(tmp_path, extra)
    with torch.no_grad():
        for p in model.parameters():  # away from the init
            p.add_(0.1 * torch.randn_like(p))
    users = np.arange(50)
    with torch.no_grad():
        cpu_user = model.user_arch(user_features(model.spec, ctx, users, data.train, CPU))
        cpu_item = model.item_arch(item_features(model.spec, ctx, CPU))
        model.to(CUDA)
        cuda_user = model.user_arch(user_features(model.spec, ctx, users, data.train, CUDA))
        cuda_item = model.item_arch(item_features(model.spec, ctx, CUDA))
    assert cuda_user.is_cuda and cuda_item.is_cuda
    torch.testing.assert_close(cuda_user.cpu(), cpu_user, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cuda_item.cpu(), cpu_item, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", ["two_tower.yaml", "hybrid.yaml"])
def test_cuda_amp_run_trains_like_cpu_and_exports_a_matching_bundle(tmp_path, config):
    runs = {d: train(load_config(REPO / "configs" / config, overrides(tmp_path, d))) for d in ("cpu", "cuda")}
    cpu, cuda = runs["cpu"].metrics, runs["cuda"].metrics
    # bf16 autocast and CUDA kernels change the numbers, not the quality
    print("ndcg@10 cpu", cpu["test/ndcg@10"], "cuda", cuda["test/ndcg@10"], "popularity", cuda["baseline/popularity/ndcg@10"])
    assert cuda["test/ndcg@10"] > cuda["baseline/popularity/ndcg@10"]
    assert abs(cuda["test/ndcg@10"] - cpu["test/ndcg@10"]) < 0.05, (cuda["test/ndcg@10"], cpu["test/ndcg@10"])
    # the exported ONNX tower (CPU) equals the CUDA-trained TorchRec tower
    assert max(cuda["parity/torchrec_vs_onnx"], cuda["parity/torchrec_vs_plain"]) <= 1e-5
    assert (runs["cuda"].artifact_dir / "user_tower.onnx").exists()


@pytest.mark.parametrize("extra", [[], HYBRID + ["model.item_bias=true"]], ids=["plain", "hybrid"])
def test_per_sample_gradients_on_cuda_equal_per_user_autograd(tmp_path, extra):
    cfg, data, ctx, model = built(tmp_path, ["privacy.mode=dp", *extra])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.to(CUDA)
    assert_per_sample_gradients_are_per_user(cfg, model, ctx, data.train, CUDA, atol=1e-5)


def test_private_cuda_run_spends_the_cpu_runs_epsilon(tmp_path):
    extra = ["privacy.mode=dp", "privacy.target_epsilon=4", "trainer.epochs=4", "trainer.batch_size=64"]
    runs = {d: train(load_config(REPO / "configs" / "two_tower.yaml", overrides(tmp_path, d, extra))) for d in ("cpu", "cuda")}
    cpu, cuda = (runs[d].manifest["provenance"]["privacy"] for d in ("cpu", "cuda"))
    assert cuda["epsilon"] == pytest.approx(cpu["epsilon"]) and cuda["epsilon"] <= 4.0 + 1e-6
    assert cuda["noise_multiplier"] == pytest.approx(cpu["noise_multiplier"]) and cuda["steps"] == cpu["steps"]
    assert runs["cuda"].metrics["test/ndcg@10"] > 0
    assert runs["cuda"].metrics["parity/torchrec_vs_onnx"] <= 1e-5


def test_task_scores_the_same_on_cuda(tmp_path):
    cfg, data, ctx, model = built(tmp_path)
    task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))
    users = np.arange(40)
    cpu_top = task.topk(model, ctx, data.train, users, CPU)
    model.to(CUDA)
    cuda_top = task.topk(model, ctx, data.train, users, CUDA)
    assert (np.asarray(cuda_top) == np.asarray(cpu_top)).mean() > 0.99  # ties may order differently


def test_device_batches_on_cuda_equal_the_host_batches_and_build_steps_without_a_host_sync(tmp_path):
    """trainer.device_batches on CUDA: for one hide mask and user order, the CUDA batches are the
    numpy path's; after the epoch's layout (the first batch), building a step never syncs."""
    from training.data import _device_batches, csr_from_mask, device_epoch_batches

    cfg, data, ctx, model = built(tmp_path, ["model.use_user_id=true", "model.use_demographics=true"])
    train = data.train
    rng = np.random.default_rng(0)
    hide = rng.random(len(train[1])) < 0.3
    users = rng.permutation(np.flatnonzero(np.diff(train[0]) > 0))
    gen = torch.Generator(device=CUDA).manual_seed(0)
    got = list(_device_batches(model.spec, ctx, train, 64, 0.0, gen, CUDA, 0.0, torch.from_numpy(hide).to(CUDA), torch.from_numpy(users).to(CUDA)))
    history = csr_from_mask(train, ~hide)
    for i, b in enumerate(got):
        want = user_features(model.spec, ctx, users[64 * i : 64 * (i + 1)], history, CPU)
        assert torch.equal(b.features.values().cpu(), want.values()) and torch.equal(b.features.lengths().cpu(), want.lengths())
        torch.testing.assert_close(b.features.weights().cpu(), want.weights(), rtol=1e-6, atol=1e-7)
    it = device_epoch_batches(model.spec, ctx, train, 64, 0.3, 0.1, np.random.default_rng(1), CUDA, 0.2)
    next(it)  # the epoch's layout: its syncs are once per epoch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps = sum(1 for _ in it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps >= 1


@pytest.mark.parametrize("switch", [["trainer.compile=true"], ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"], ["trainer.device_batches=false"]],
                         ids=["compile", "cuda-graphs", "host-batches"])  # fmt: skip
def test_cuda_switches_train_like_the_default_cuda_run(tmp_path, switch):
    from training.trainer import Trainer

    def run(extra, where):
        cfg, data, ctx, model = built(tmp_path / where, ["trainer.epochs=3", "trainer.device=cuda", *extra])
        model.to(CUDA)
        task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))
        trainer = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, cfg.model.user_id_dropout, CUDA)
        return [h["train/loss"] for h in trainer.fit(data.train, None, None, ctx).history]

    default, switched = run([], "a"), run(switch, "b")
    assert switched[-1] < switched[0]
    # bf16 autocast, and (device_batches=false) other random draws: the same trajectory within a few percent
    assert switched == pytest.approx(default, rel=0.05)
