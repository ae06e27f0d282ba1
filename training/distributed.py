"""Scale-out training: the same TwoTower under TorchRec's DistributedModelParallel.

- Sharding: `EmbeddingShardingPlanner` picks a plan for the world size and device, constrained to
  what the device can run (CPU + gloo: table_wise / column_wise / data_parallel; CUDA + NCCL adds
  row_wise). Model-parallel tables train with an optimizer fused into their backward (FBGEMM);
  data-parallel tables and the MLPs are replicated, their gradients averaged with all-reduce, and
  stepped by the trainer's Adam. The model code is untouched: `RetrievalTask.loss` runs on the
  sharded module exactly as on the plain one.
- Data (`distributed.data: memory`): every rank draws the same global batches (same seed, same
  `epoch_batches`) and keeps its contiguous slice of the users. Each rank's loss is its mean scaled
  by (its users x world / global users), so the averaged gradient is the gradient of the global
  batch mean: the loss curve is the single-process one at any world size (full softmax; sampled
  softmax draws its in-batch negatives per rank). (`data: shards`): each rank streams its own
  Parquet shards (features.shards), see `shard_batches`.
- Checkpoints: the sharded tables are gathered to rank 0 (ShardedTensor.gather) into a plain
  state_dict in the Trainer's file format, so `TwoTower.load_state_dict`, `trustrec export` and a
  run at another world size all read it. Rank 0 alone validates, logs to MLflow and exports.
- Launch: `trustrec train --distributed N` runs `python -m torch.distributed.run` on this host, or
  Ray Train's TorchTrainer (`distributed.launcher: ray`) for several nodes.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from training.config import ConfigError, DistributedConfig, TrainConfig, load_config
from training.data import CSR, Context, UserBatch, epoch_batches
from training.model import TwoTower
from training.task import RetrievalTask
from training.trainer import EarlyStopping, FitResult, lr_at, pick_device, resume_point, seed_everything

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LEGAL_SHARDING = {
    "cpu": ("data_parallel", "table_wise", "column_wise"),  # TorchRec's CPU kernels (FBGEMM CPU TBE)
    "cuda": ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise"),
}


# -- process group and device ----------------------------------------------------------------
def worker_device(cfg: TrainConfig) -> torch.device:
    """CUDA device of this process's local rank when training on GPUs, else the CPU."""
    device = pick_device(cfg.trainer.device)
    if device.type == "cuda":
        # one GPU per local rank; modulo: Ray Train shows each worker only its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def backend_for(cfg: DistributedConfig, device: torch.device) -> str:
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    return cfg.backend


def init_process_group(cfg: DistributedConfig, device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the group). torchrun's env:// variables, or a group
    Ray Train already made."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ:
        raise RuntimeError("no process group: start workers with `trustrec train --distributed N` (torchrun) or Ray Train")
    dist.init_process_group(backend_for(cfg, device), timeout=timedelta(seconds=cfg.timeout_s))
    return dist.get_rank(), dist.get_world_size(), True


# -- sharding plan ------------------------------------------------------------------------
def allowed_sharding_types(cfg: DistributedConfig, device_type: str) -> list[str]:
    legal = LEGAL_SHARDING["cuda" if device_type == "cuda" else "cpu"]
    wanted = list(cfg.sharding_types or legal)
    illegal = [s for s in wanted if s not in legal]
    if illegal:
        raise ConfigError(f"distributed.sharding_types: {illegal} cannot run on {device_type} (allowed there: {list(legal)})")
    return wanted


def table_names(model: TwoTower) -> list[str]:
    return [t.name for arch in (model.user_arch, model.item_arch) for t in arch.ebc.embedding_bag_configs()]


def plan_sharding(model: TwoTower, world_size: int, device_type: str, sharding_types: list[str], local_world_size: int | None = None,
                  batch_size: int | None = None, pg: Any = None):  # fmt: skip
    """Planner-chosen `ShardingPlan`; with a process group the plan is made on rank 0 and broadcast
    (every rank must shard alike). Without one it is computed locally (tests, dry runs)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    constraints = {name: ParameterConstraints(sharding_types=list(sharding_types)) for name in table_names(model)}
    topology = Topology(world_size=world_size, local_world_size=local_world_size or world_size, compute_device=device_type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, batch_size=batch_size, debug=False)
    sharders = [EmbeddingBagCollectionSharder()]
    return planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)


def plan_summary(plan) -> dict[str, dict[str, Any]]:
    """{table: {sharding_type, compute_kernel, ranks}}: what the planner chose, for logs and MLflow."""
    out = {}
    for module_plan in plan.plan.values():
        for table, p in module_plan.items():
            out[table] = {"sharding_type": p.sharding_type, "compute_kernel": p.compute_kernel, "ranks": list(p.ranks or [])}
    return out


# -- the sharded model ----------------------------------------------------------------------
def _embedding_optimizer(name: str, device_type: str) -> tuple[type, dict[str, Any]]:
    if name == "auto":
        name = "adam" if device_type == "cuda" else "adagrad"
    if name == "adam" and device_type != "cuda":
        raise ConfigError("distributed.embedding_optimizer: FBGEMM's CPU kernels have no fused Adam; use adagrad, rowwise_adagrad or sgd")
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {}
    return {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[name], {}


def _data_parallel_wrapper():
    from torchrec.distributed.model_parallel import DataParallelWrapper

    class ExplicitAllReduce(DataParallelWrapper):
        """No DDP around the dense parts: the task calls the arches directly (not the module's
        forward), so the replicated gradients are averaged by `allreduce_gradients` instead."""

        def wrap(self, dmp, env, device) -> None:
            return None

    return ExplicitAllReduce()


def shard_model(model: TwoTower, plan, device: torch.device, embedding_optimizer: str, lr: float):
    """Wrap `model` (modified in place) in DistributedModelParallel with `plan`, keeping its weights."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = {t: s["sharding_type"] for t, s in plan_summary(plan).items()}
    fused = [bag.weight for arch in (model.user_arch, model.item_arch) for name, bag in arch.ebc.embedding_bags.items() if kinds.get(name) != "data_parallel"]
    if fused:
        cls, kwargs = _embedding_optimizer(embedding_optimizer, device.type)
        apply_optimizer_in_backward(cls, fused, {"lr": lr, **kwargs})
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=[EmbeddingBagCollectionSharder()], data_parallel_wrapper=_data_parallel_wrapper())
    load_plain_state_dict(dmp, plain)  # the sharded tables start re-initialized: give them the model's weights
    return dmp


def replicated_parameters(dmp) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(parameters whose gradients we all-reduce: the MLPs, parameters the dense optimizer steps:
    the MLPs + data-parallel tables, which TorchRec's own DDP lookup already averages)."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    sharded = set(DistributedModelParallel._sharded_parameter_names(dmp._dmp_wrapped_module))
    params = dict(dmp.named_parameters())
    dense = [p for n, p in params.items() if n not in sharded]
    stepped = [p for _, p in in_backward_optimizer_filter(params.items(), include=False)]
    return dense, stepped


def allreduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of replicated parameters over ranks (one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _is_sharded(value: Any) -> bool:
    return hasattr(value, "local_shards") and hasattr(value, "gather")


def plain_state_dict(dmp, rank: int, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The unsharded state_dict (CPU tensors) on rank `dst`, None elsewhere. Collective: every rank calls."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if _is_sharded(value):
            # NCCL gathers into device memory; gloo into host memory (dmp.device is the rank's device)
            full = torch.empty(value.size(), dtype=value.dtype, device=dmp.device) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full.cpu()
        elif hasattr(value, "full_tensor"):  # DTensor
            out[key] = value.full_tensor().detach().cpu().clone()
        else:
            out[key] = value.detach().cpu().clone()
    return out if rank == dst else None


@torch.no_grad()
def load_plain_state_dict(dmp, state: dict[str, torch.Tensor]) -> None:
    """Copy a plain (single-process) state_dict into the sharded model, each rank its own slices."""
    for key, value in dmp.state_dict().items():
        if key not in state:
            raise KeyError(f"checkpoint has no {key!r} (a model built with other features?)")
        src = state[key]
        if tuple(src.shape) != tuple(value.shape):
            raise ValueError(f"checkpoint {key}: shape {tuple(src.shape)}, model {tuple(value.shape)} (other data or model sizes?)")
        if _is_sharded(value):
            for shard in value.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(src[r : r + h, c : c + w])
        else:
            value.copy_(src)


# -- per-rank batches -----------------------------------------------------------------------
def slice_kjt(kjt, lo: int, hi: int):
    """Rows lo:hi of every key of a KeyedJaggedTensor."""
    from torchrec import KeyedJaggedTensor

    values, lengths, weights = [], [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[lo] : offsets[hi]])
        lengths.append(jt.lengths()[lo:hi])
        if jt.weights_or_none() is not None:
            weights.append(jt.weights()[offsets[lo] : offsets[hi]])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths), weights=torch.cat(weights) if weights else None
    )


def rank_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice of n rows for `rank` (sizes differ by at most one, larger first)."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


def rank_slice(batch: UserBatch, rank: int, world: int) -> UserBatch:
    lo, hi = rank_bounds(len(batch.users), rank, world)
    indptr, targets = batch.targets
    return UserBatch(batch.users[lo:hi], slice_kjt(batch.features, lo, hi), (indptr[lo : hi + 1] - indptr[lo], targets[indptr[lo] : indptr[hi]]))


# -- the loop -------------------------------------------------------------------------------
@dataclass
class DistributedTrainer:
    """Trainer semantics (seeding, Adam, lr schedule, AMP on CUDA, per-epoch validation, early
    stopping, a checkpoint per epoch, resume) over a sharded model. Validation, checkpoints and
    `on_epoch` run on rank 0 from the gathered weights; the decision to stop is broadcast."""

    cfg: TrainConfig
    model: TwoTower  # unsharded: shard_model wraps it
    task: RetrievalTask
    device: torch.device
    rank: int
    world: int
    plan: Any
    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None

    def __post_init__(self) -> None:
        t, d = self.cfg.trainer, self.cfg.distributed
        self.spec = self.model.spec
        self.eval_model = TwoTower(self.spec, device=self.device) if self.rank == 0 else None
        self.dmp = shard_model(self.model, self.plan, self.device, d.embedding_optimizer, d.embedding_lr or t.lr)
        self.module = self.dmp.module  # TwoTower with sharded EBCs: what the task calls
        self.reduced, stepped = replicated_parameters(self.dmp)
        self.optimizer = torch.optim.Adam(stepped, lr=t.lr, weight_decay=t.weight_decay)
        self.ckpt_dir = Path(t.checkpoint_dir)
        self.amp = t.amp and self.device.type == "cuda"
        self.monitor = f"val/ndcg@{self.task.k}"

    # checkpoints: the Trainer's format with plain weights (optimizer moments are sharded and stay out)
    def _save(self, epoch: int, state: dict[str, torch.Tensor], rng: np.random.Generator, extra: dict) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "epoch": epoch, "model": state, "optimizer": None, "world_size": self.world, "plan": plan_summary(self.plan),
            "rng": {"numpy_generator": rng.bit_generator.state, "numpy_global": np.random.get_state(), "python": random.getstate(),
                    "torch": torch.get_rng_state(), "cuda": []},
            "spec": asdict(self.spec), **extra,
        }  # fmt: skip
        tmp = self.ckpt_dir / f".epoch-{epoch:03d}.pt.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.ckpt_dir / f"epoch-{epoch:03d}.pt")  # atomic

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.ckpt_dir.glob("epoch-*.pt"))
        return found[-1] if found else None

    def _restore(self, path: Path, rng: np.random.Generator) -> dict:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        load_plain_state_dict(self.dmp, payload["model"])
        rng.bit_generator.state = payload["rng"]["numpy_generator"]
        np.random.set_state(payload["rng"]["numpy_global"])
        random.setstate(payload["rng"]["python"])
        torch.set_rng_state(payload["rng"]["torch"])
        log.info("resumed weights from %s (epoch %d, written at world size %s); optimizer moments restart", path, payload["epoch"], payload.get("world_size", 1))
        return payload

    def _step(self, part: UserBatch, share: float, ctx: Context) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.task.loss(self.module, part, ctx) * share
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # model-parallel tables are updated inside (fused optimizer)
        allreduce_gradients(self.reduced, self.world)
        self.optimizer.step()
        return loss.detach().float()

    def _reduce_mean(self, total: torch.Tensor, count: int) -> float:
        """Mean over steps of the global-batch loss: the ranks' shared losses sum to world x it."""
        if self.world > 1:
            dist.all_reduce(total)
        return float(total) / (max(count, 1) * self.world)

    def fit(self, train: CSR, val_history: CSR | None, val_truth: CSR | None, ctx: Context, resume: bool = False,
            batches: Callable[[int, np.random.Generator], Iterator[tuple[UserBatch, int]]] | None = None) -> FitResult:  # fmt: skip
        """`batches(epoch, rng)` yields (this rank's batch, global batch users); default: the
        in-memory global batches of `train`, sliced per rank. No validation data: run every epoch."""
        started = time.perf_counter()
        t = self.cfg.trainer
        validate = val_truth is not None
        rng = seed_everything(t.seed)
        stopping = EarlyStopping(t.patience, t.min_delta, t.max_seconds)
        start, best_state, history = resume_point(self, resume, rng, stopping)
        batches = batches or (lambda epoch, rng: self._memory_batches(train, ctx, rng))
        epoch = start - 1
        for epoch in range(start, t.epochs + 1):
            if validate and stopping.bad >= stopping.patience:
                epoch = start - 1
                break
            self.dmp.train()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(t.lr, t.lr_schedule, epoch, t.epochs)
            total, count, seen = torch.zeros((), dtype=torch.float64, device=self.device), 0, 0
            bar = tqdm(batches(epoch, rng), desc=f"epoch {epoch}/{t.epochs} rank {self.rank}", disable=not t.progress or self.rank != 0, leave=False)
            for part, n_global in bar:
                total += self._step(part, len(part.users) * self.world / n_global, ctx).double()
                count, seen = count + 1, seen + len(part.users)
            metrics = {"train/loss": self._reduce_mean(total, count)}
            state = plain_state_dict(self.dmp, self.rank)  # collective: every rank takes part
            stop = False
            if self.rank == 0:
                if validate:
                    self.eval_model.load_state_dict(state)
                    metrics.update({f"val/{k}": v for k, v in self.task.metrics(self.eval_model, val_history, val_truth, ctx, self.device).items()})
                    if stopping.update(metrics[self.monitor], epoch):
                        best_state = state
                    stop = stopping.stop_reason(time.perf_counter() - started)
                else:
                    stopping.best_epoch, best_state = epoch, state
                history.append({"epoch": epoch, **metrics})
                log.info("epoch %d %s (%d users on rank 0)", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), seen)
                self.on_epoch(epoch, metrics)
                self._save(epoch, state, rng, {**stopping.state(), "best_state": best_state, "history": history})
            decision = [stop, history, stopping.best, stopping.best_epoch]
            if self.world > 1:
                dist.broadcast_object_list(decision, src=0)
            stop, history, stopping.best, stopping.best_epoch = decision
            if stop:
                log.info("early stop at epoch %d (best %d): %s: %s", epoch, stopping.best_epoch, self.monitor, stop)
                break
        if self.rank == 0 and best_state is not None:
            self.eval_model.load_state_dict(best_state)
        return FitResult(stopping.best_epoch, stopping.best, epoch, history, time.perf_counter() - started)

    def _memory_batches(self, train: CSR, ctx: Context, rng: np.random.Generator) -> Iterator[tuple[UserBatch, int]]:
        """The single-process global batches (same rng on every rank), this rank's slice of each.
        A last batch with fewer users than ranks is skipped (every rank must step together)."""
        m, t = self.cfg.model, self.cfg.trainer
        for batch in epoch_batches(self.spec, ctx, train, t.batch_size, self.cfg.task.history_dropout, m.user_id_dropout, rng,
                                   self.device, m.demographics_dropout, m.stated_dropout):  # fmt: skip
            if len(batch.users) >= self.world:
                yield rank_slice(batch, self.rank, self.world), len(batch.users)


# -- the run behind `trustrec train --distributed N` -----------------------------------------
def check_config(cfg: TrainConfig) -> None:
    if cfg.privacy.mode != "none":
        raise ConfigError(f"privacy.mode: {cfg.privacy.mode} has its own training loop; --distributed trains centrally (mode none)")
    if cfg.trainer.refit:
        raise ConfigError("trainer.refit: not supported with --distributed")
    if cfg.model.year_buckets != "decade":
        raise ConfigError("model.year_buckets: only 'decade' with --distributed (the shard reader buckets release years by decade)")
    if cfg.model.item_bias:
        raise ConfigError("model.item_bias: not supported with --distributed (its bias table sits outside the sharded EmbeddingBagCollections)")
    if cfg.blend.ease:
        raise ConfigError("blend.ease: not supported with --distributed (EASE's dense item x item matrix is for small catalogs)")
    if cfg.search.enabled:
        raise ConfigError("search.enabled: not supported with --distributed (choose the settings with a single-process run, then set them)")
    if cfg.distributed.data == "shards" and not cfg.distributed.shards_path:
        raise ConfigError("distributed.shards_path: required when distributed.data is shards")


def _finish(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data, ctx: Context, fit: FitResult, tracker, device: torch.device, tags: dict):
    """Rank 0, after the fit: the single-process pipeline's test -> export -> store -> MLflow steps."""
    from training.pipeline import finish

    provenance = {"data": data.provenance(), "distributed": {"world_size": tags["world_size"], "plan": tags["plan"]}}
    return finish(cfg, model, task, data, ctx, fit, tracker, device, provenance, {"sharding_plan.json": tags["plan"]})


def run_worker(cfg: TrainConfig, resume: bool = False):
    """One rank of a distributed run (inside torchrun or a Ray Train worker). Rank 0 returns the
    RunResult (memory data) or the FitResult (shards); other ranks return None."""
    from training.pipeline import build_model, context, item_counts, prepare
    from training.tracking import Tracker, git_sha

    check_config(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = worker_device(cfg)
    rank, world, owns_group = init_process_group(cfg.distributed, device)
    if rank != 0:
        logging.getLogger("training").setLevel(logging.WARNING)
    try:
        if cfg.distributed.data == "shards":
            return _run_shards(cfg, device, rank, world, resume)
        data = prepare(cfg)
        ds = data.dataset
        seed_everything(cfg.trainer.seed)  # same initial weights on every rank, and as a single-process run
        ctx = context(cfg, ds)
        model = build_model(cfg, ds, ctx, device)
        task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items), cfg.model.item_id_dropout)
        types = allowed_sharding_types(cfg.distributed, device.type)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        plan = plan_sharding(model, world, device.type, types, local, cfg.trainer.batch_size, pg=dist.GroupMember.WORLD)
        summary = plan_summary(plan)
        log.info("dataset %s: %d users, %d items; %d ranks on %s (%s); plan %s", ds.name, ds.n_users, ds.n_items, world, device.type,
                 backend_for(cfg.distributed, device), {t: s["sharding_type"] for t, s in summary.items()})  # fmt: skip
        tracker = Tracker(cfg.tracking.enabled and rank == 0, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        tags = {"model": cfg.model.kind, "dataset": ds.name, "split": cfg.split.protocol, "git_sha": git_sha() if rank == 0 else "",
                "device": device.type, "world_size": world, "plan": summary}  # fmt: skip
        tracker.start_training(cfg, ds, {k: str(v) for k, v in tags.items() if k != "plan"}, data.seen_interactions, data.split.test)
        try:
            trainer = DistributedTrainer(cfg, model, task, device, rank, world, plan, on_epoch=lambda e, m: tracker.log_metrics(m, step=e))
            fit = trainer.fit(data.train, data.train, data.val, ctx, resume=resume)
            result = _finish(cfg, trainer.eval_model, task, data, ctx, fit, tracker, device, tags) if rank == 0 else None
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end()
        return result
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


# -- streaming shards -----------------------------------------------------------------------
def shards_context(shards) -> Context:
    """Side features of a shard directory: item genres and decades; no user side tables."""
    from features.content import ItemSide, UserSide, year_bucket

    items = shards.items()
    n_users, n_items = shards.n_users, shards.n_items
    empty_users = (np.zeros(n_users + 1, np.int64), np.zeros(0, np.int64))
    zeros = np.zeros(n_users, np.int64)
    users = UserSide(zeros, zeros, zeros, empty_users, empty_users, [], [])
    return Context(users, ItemSide(items["genres"], year_bucket(items["year"]), (np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64))))


def shard_batches(cfg: TrainConfig, shards, spec, ctx: Context, rank: int, world: int, device: torch.device) -> Callable:
    """`batches(epoch, rng)` for DistributedTrainer.fit over streamed shards.

    Each rank reads its own shard files (`files[rank::world]`, in an epoch-shuffled order) as blocks
    of complete users, hides ~history_dropout of each user's items exactly as `epoch_batches` does,
    and steps on local batches of batch_size / world users, so a step still covers trainer.batch_size
    users. Every rank takes the same number of steps (the smallest rank's count of full batches, from
    the manifest, no communication); the users past it wait for the next epoch's shuffle."""
    m, t = cfg.model, cfg.trainer
    local = max(t.batch_size // world, 1)
    steps = min(shards.users_for(r, world) for r in range(world)) // local
    if steps == 0:
        raise ConfigError(f"trainer.batch_size: {t.batch_size} users per step leaves some of the {world} ranks without a full batch of {local}")

    def batches(epoch: int, rng: np.random.Generator) -> Iterator[tuple[UserBatch, int]]:
        taken = 0
        order = np.random.default_rng([t.seed, epoch, rank]).permutation(len(shards.files_for(rank, world)))
        for block in shards.iter_user_blocks(rank, world, users_per_block=64 * local, batch_rows=cfg.distributed.read_batch_rows, order=order):
            indptr = np.zeros(shards.n_users + 1, np.int64)
            np.add.at(indptr, block.users + 1, np.diff(block.indptr))
            csr = (np.cumsum(indptr), block.items, block.ratings)
            for batch in epoch_batches(spec, ctx, csr, local, cfg.task.history_dropout, m.user_id_dropout, rng, device, m.demographics_dropout, m.stated_dropout):
                if len(batch.users) < local:
                    continue  # a block's tail: fixed-size steps keep the ranks in lockstep
                yield batch, local * world
                taken += 1
                if taken == steps:
                    return
        raise RuntimeError(f"rank {rank}: shards gave {taken} full batches, the manifest promised {steps} (users without rows?)")

    return batches


def _run_shards(cfg: TrainConfig, device: torch.device, rank: int, world: int, resume: bool) -> FitResult | None:
    """Train over streamed Parquet shards: no validation split, a checkpoint per epoch; rank 0 logs
    train loss, throughput and the checkpoint to MLflow. Export from the checkpoint afterwards."""
    from features.shards import ShardSet
    from training.model import TowerSpec
    from training.tracking import Tracker

    shards = ShardSet.open(cfg.distributed.shards_path)
    m = cfg.model
    spec = TowerSpec(n_users=shards.n_users, n_items=shards.n_items, n_genres=shards.n_genres, embedding_dim=m.embedding_dim, hidden_dim=m.hidden_dim,
                     output_dim=m.output_dim, hidden_layers=m.hidden_layers, use_user_id=m.use_user_id, use_genres=m.use_genres,
                     temperature=m.temperature)  # fmt: skip
    if m.use_content or m.use_demographics or m.use_stated:
        raise ConfigError("model.use_content/use_demographics/use_stated: shards carry interactions and item genres only")
    ctx = shards_context(shards)
    seed_everything(cfg.trainer.seed)
    model = TwoTower(spec, device=device)
    task = RetrievalTask(cfg.task, shards.item_counts(), m.item_id_dropout)
    plan = plan_sharding(model, world, device.type, allowed_sharding_types(cfg.distributed, device.type), int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                         cfg.trainer.batch_size, pg=dist.GroupMember.WORLD)  # fmt: skip
    tracker = Tracker(cfg.tracking.enabled and rank == 0, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    tracker.start(cfg.tracking.run_name, cfg.flat(), {"model": m.kind, "dataset": f"shards:{Path(cfg.distributed.shards_path).name}", "device": device.type, "world_size": str(world)})
    try:
        trainer = DistributedTrainer(cfg, model, task, device, rank, world, plan, on_epoch=lambda e, mt: tracker.log_metrics(mt, step=e))
        fit = trainer.fit((np.zeros(1, np.int64), np.zeros(0, np.int64)), None, None, ctx, resume, batches=shard_batches(cfg, shards, spec, ctx, rank, world, device))
        if rank == 0:
            tracker.log_metrics({"train/seconds": fit.seconds, "train/epochs_run": float(fit.epochs_run)})
            tracker.log_dict(plan_summary(plan), "sharding_plan.json")
            tracker.log_dict(fit.history, "history.json")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return fit if rank == 0 else None


# -- launchers ------------------------------------------------------------------------------
def _worker_args(config: str | None, overrides: list[str], resume: bool) -> list[str]:
    args = ["--config", str(config)] if config else []
    for assignment in overrides:
        args += ["--set", assignment]
    return args + (["--resume"] if resume else [])


def launch(config: str | None, overrides: list[str], nproc: int | None = None, resume: bool = False) -> int:
    """`trustrec train --distributed N`: N workers on this host (torchrun), or Ray Train workers."""
    overrides = list(overrides) + ([f"distributed.world_size={nproc}"] if nproc else [])
    cfg = load_config(config, overrides)  # fail on a bad key before starting any process
    check_config(cfg)
    n = cfg.distributed.world_size
    if cfg.distributed.launcher == "ray":
        result = launch_ray(cfg, resume)
        print(f"Ray Train run {result.path}; metrics and the bundle are in MLflow ({cfg.tracking.tracking_uri}) and {cfg.export.output_dir}")
        return 0
    if pick_device(cfg.trainer.device).type == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"distributed.world_size: {n} processes but {torch.cuda.device_count()} CUDA devices (one process per GPU)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "training.distributed", *_worker_args(config, overrides, resume)]
    log.info("launching %d workers: %s", n, " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # no oversubscription
    return subprocess.run(cmd, env=env).returncode


def _ray_loop(loop_config: dict) -> None:
    """Ray Train worker: the process group exists already (TorchConfig's backend)."""
    import ray.train

    os.chdir(loop_config["cwd"])  # relative paths in the config mean the launcher's directory (shared FS on several nodes)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    result = run_worker(TrainConfig.model_validate(loop_config["config"]), loop_config["resume"])
    metrics = getattr(result, "metrics", None) or (result.history[-1] if result is not None and result.history else {})
    ray.train.report({k.replace("/", "_"): float(v) for k, v in metrics.items() if not k.startswith("beyond/")})


def launch_ray(cfg: TrainConfig, resume: bool = False):
    """Ray Train's TorchTrainer with world_size workers (local Ray, or `distributed.ray_address`)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    use_gpu = pick_device(cfg.trainer.device).type == "cuda"
    if not ray.is_initialized():
        ray.init(address=d.ray_address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, log_to_driver=True)
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume": resume, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=d.world_size, use_gpu=use_gpu, resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend=backend_for(d, torch.device("cuda" if use_gpu else "cpu")), timeout_s=d.timeout_s),
        run_config=RunConfig(name=f"trustrec-{int(time.time())}", storage_path=str(Path(cfg.trainer.checkpoint_dir).resolve() / "ray")),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (torchrun runs `python -m training.distributed`)."""
    p = argparse.ArgumentParser(prog="training.distributed")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    fmt = "%(asctime)s %(levelname)s rank" + os.environ.get("RANK", "?") + " %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, force=True)  # torchrec configures logging on import
    for name in ("features", "training"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # the planner's advice on topology factories is noise here
    result = run_worker(load_config(args.config, args.set), args.resume)
    if result is not None and hasattr(result, "run_id"):
        print(f"run {result.run_id}  model version {result.model_version}  artifacts {result.artifact_dir}")
        width = max(len(k) for k in result.metrics)
        print("\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in result.metrics.items() if not k.startswith("beyond/")))
    elif result is not None:
        print(f"trained {result.epochs_run} epochs in {result.seconds:.1f}s; last train/loss {result.history[-1]['train/loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
