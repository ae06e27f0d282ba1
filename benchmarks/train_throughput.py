"""Training throughput: single process vs TorchRec DistributedModelParallel over 1 and 2 processes
on the CPU (gloo) and, when CUDA is present, on the GPU(s) with bf16 AMP, on the same synthetic data.

    python benchmarks/train_throughput.py                          # default scale, CPU (+ GPU when present)
    python benchmarks/train_throughput.py --users 2000 --items 1000 --epochs 2      # a quick run
    python benchmarks/train_throughput.py --shards DIR             # stream Parquet shards (features.shards)
    python benchmarks/train_throughput.py --shards DIR --modes trainer,cuda-trainer --steps-per-epoch 150
                                                                   # 1M x 1M: the shards read into memory, capped epochs
    python benchmarks/train_throughput.py --modes cpu-dmp-2        # one row only

Modes: `trainer` (the project's single-process Trainer), `cpu-dmp-1`, `cpu-dmp-2` (torchrun ranks,
planner-chosen sharding), `cuda-trainer` / `cuda-dmp-N` (N = visible GPUs) when CUDA is available;
by name also `cuda-dmp-N` with more ranks than GPUs (sharing them) and, with --shards, `trainer` /
`cuda-trainer`. `--config configs/two_tower_dp.yaml` times DP-SGD (Opacus) instead of the Trainer.
Each mode runs in its own process(es) so the memory figures are its own. Per mode: seconds per epoch
(median of epochs 2.., epoch 1 pays warm-up; validation off, the per-epoch checkpoint gather on),
users/s (training examples) and interactions/s, peak RSS per rank and torch.cuda.max_memory_allocated
per rank; for the single-process trainer also each epoch's checkpoint and setup seconds (time to its
first batch) and users/s without them (`users_per_s_steps_only`: the steps' own rate, what a capped
epoch, `--steps-per-epoch`, measures fairly). Prints a table naming the device of every figure and
writes JSON (default benchmarks/results/train_throughput.json). On a shared host, say so next to the figures: they move
with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)


def shards_in_memory(cfg, device):
    """(train CSR, context, model, task) of a whole shard directory read into memory: the 1M x 1M
    scale, which features.synthetic (O(users x items)) cannot generate; the model as
    training.distributed._run_shards builds it."""
    import numpy as np

    from features.shards import ShardSet
    from training.distributed import shards_context
    from training.model import TowerSpec, TwoTower
    from training.task import RetrievalTask
    from training.trainer import seed_everything

    shards = ShardSet.open(cfg.distributed.shards_path)
    users, items, ratings = [], [], []
    for _, batch in shards.iter_batches(0, 1, cfg.distributed.read_batch_rows):
        users.append(batch.column("user").to_numpy())
        items.append(batch.column("item").to_numpy())
        ratings.append(batch.column("rating").to_numpy())
    user = np.concatenate(users)  # rows sorted by user within a shard, shards in user order
    indptr = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=shards.n_users))]).astype(np.int64)
    m = cfg.model
    spec = TowerSpec(n_users=shards.n_users, n_items=shards.n_items, n_genres=shards.n_genres, embedding_dim=m.embedding_dim, hidden_dim=m.hidden_dim,
                     output_dim=m.output_dim, hidden_layers=m.hidden_layers, use_user_id=m.use_user_id, use_genres=m.use_genres, temperature=m.temperature)  # fmt: skip
    seed_everything(cfg.trainer.seed)
    task = RetrievalTask(cfg.task, shards.item_counts(), m.item_id_dropout)
    return (indptr, np.concatenate(items).astype(np.int64), np.concatenate(ratings)), shards_context(shards), TwoTower(spec, device=device), task


def instrument(trainer, saves: list[float], setups: list[float]) -> None:
    """Record how long each per-epoch checkpoint takes (`saves`; at 1M x 1M, model + Adam state is ~1.5 GB:
    a save longer than a capped epoch's steps) and each epoch's setup (`setups`): the time to its first
    batch (hide mask, shuffle and CSR split of the whole data, or the device layout), paid once per epoch,
    so a capped epoch (steps_per_epoch) over-weights it. The steps' own rate is reported without both."""
    save, batches = trainer._save, trainer._batches

    def timed_save(*a, **kw):
        t = time.perf_counter()
        save(*a, **kw)
        saves.append(time.perf_counter() - t)

    def timed_batches(*a, **kw):
        it = iter(batches(*a, **kw))
        t = time.perf_counter()
        first = next(it, None)
        setups.append(time.perf_counter() - t)
        if first is not None:
            yield first
            yield from it

    trainer._save, trainer._batches = timed_save, timed_batches


# -- one measurement (runs in the child process) ----------------------------------------------
def measure(spec: dict) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from training import distributed as D
    from training.config import load_config
    from training.pipeline import build_model, context, item_counts, prepare
    from training.task import RetrievalTask
    from training.trainer import Trainer, seed_everything

    cfg = load_config(spec["config"], spec["overrides"])
    torch.set_num_threads(cfg.trainer.num_threads)
    distributed = spec["mode"] != "trainer"
    device = D.worker_device(cfg)
    rank, world = 0, 1
    if distributed:
        rank, world, _ = D.init_process_group(cfg.distributed, device)
    shards, dp = cfg.distributed.data == "shards", cfg.privacy.mode == "dp"
    stamps: list[float] = []
    saves: list[float] = []  # seconds of each epoch's checkpoint (single-process trainer)
    setups: list[float] = []  # seconds from each epoch's start to its first batch (single-process trainer)
    on_epoch = lambda epoch, metrics: stamps.append(time.perf_counter())  # noqa: E731
    started = time.perf_counter()
    if shards and distributed:
        fit = D._run_shards(cfg, device, rank, world, False)
        epochs = [fit.seconds / max(fit.epochs_run, 1)] * fit.epochs_run if rank == 0 else []
        from features.shards import ShardSet

        shard_set = ShardSet.open(cfg.distributed.shards_path)
        local = max(cfg.trainer.batch_size // world, 1)
        steps = min(shard_set.users_for(r, world) for r in range(world)) // local
        users, interactions = steps * local * world, steps * local * world * shard_set.manifest["rows"] / max(shard_set.n_users, 1)
    else:
        if shards:  # the single-process trainer on the shards, read into memory
            train, ctx, model, task = shards_in_memory(cfg, device)
        else:
            data = prepare(cfg)
            ds, train = data.dataset, data.train
            ctx = context(cfg, ds)
            seed_everything(cfg.trainer.seed)
            model = build_model(cfg, ds, ctx, device)
            task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items), cfg.model.item_id_dropout)
        if dp and not shards:  # DP-SGD (Opacus): its own loop, timed through the tracker it reports epochs to
            from training.privacy.dp import fit_dp
            from training.tracking import Tracker

            class Stamps(Tracker):
                def log_metrics(self, metrics, step=None):
                    if step is not None:
                        on_epoch(step, metrics)

            started = time.perf_counter()
            fit_dp(cfg, model, task, data, ctx, device, Stamps(False, "", ""))
        else:
            if distributed:
                types = D.allowed_sharding_types(cfg.distributed, device.type)
                plan = D.plan_sharding(model, world, device.type, types, batch_size=cfg.trainer.batch_size, pg=dist.GroupMember.WORLD)
                trainer = D.DistributedTrainer(cfg, model, task, device, rank, world, plan, on_epoch=on_epoch)
            else:
                m = cfg.model
                dropouts = () if shards else (m.demographics_dropout, m.stated_dropout)  # the shards' context has neither feature
                trainer = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, m.user_id_dropout, device, *dropouts, on_epoch=on_epoch)
                instrument(trainer, saves, setups)
            started = time.perf_counter()
            trainer.fit(train, None, None, ctx)
        times = [started, *stamps]
        epochs = [b - a for a, b in zip(times, times[1:])]
        users, interactions = int((np.diff(train[0]) > 0).sum()), int(train[0][-1])
        last = users % cfg.trainer.batch_size
        users -= last if distributed and 0 < last < world else 0  # a last batch with fewer users than ranks is skipped
        if cfg.trainer.steps_per_epoch is not None and not distributed and (shards or not dp):  # a capped epoch
            capped = min(users, cfg.trainer.steps_per_epoch * cfg.trainer.batch_size)
            interactions, users = round(interactions * capped / max(users, 1)), capped
    memory = {"peak_rss_mb": harness.peak_rss_mb(),
              "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}  # fmt: skip
    per_rank = [memory]
    if distributed:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, memory)
    if rank == 0:
        steady = epochs[1:] or epochs
        sec = statistics.median(steady)
        # an epoch's span holds the previous epoch's checkpoint (on_epoch stamps before the save)
        bare = [e - (saves[i - 1] if 0 < i <= len(saves) else 0.0) for i, e in enumerate(epochs)]
        bare_sec = statistics.median(bare[1:] or bare) if saves else None
        steps_only = [b - (setups[i] if i < len(setups) else 0.0) for i, b in enumerate(bare)]
        steps_sec = statistics.median(steps_only[1:] or steps_only) if saves and setups else None
        row = {
            "mode": spec["mode"], "device": spec["device_name"], "world_size": world, "amp": device.type == "cuda" and cfg.trainer.amp,
            "epochs": len(epochs), "seconds_per_epoch": sec, "first_epoch_seconds": epochs[0] if epochs else None,
            "users_per_s": users / sec, "interactions_per_s": interactions / sec, "ranks": per_rank,
            "checkpoint_seconds": saves or None, "seconds_per_epoch_excl_checkpoint": bare_sec,
            "users_per_s_excl_checkpoint": users / bare_sec if bare_sec else None,
            "epoch_setup_seconds": setups or None, "users_per_s_steps_only": users / steps_sec if steps_sec else None,
            "plan": D.plan_summary(trainer.plan) if distributed and cfg.distributed.data != "shards" else None,
            "threads_per_rank": cfg.trainer.num_threads, "compile": cfg.trainer.compile, "privacy": cfg.privacy.mode,
            "device_batches": trainer.device_batches if not distributed and cfg.privacy.mode != "dp" else None,
            "steps_per_epoch": cfg.trainer.steps_per_epoch, "users_per_epoch": users,
            "sharding_types": cfg.distributed.sharding_types if distributed else None,  # the planner's allowed set (null: the device's legal set)
        }  # fmt: skip
        Path(spec["out"]).write_text(json.dumps(row))
    if distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- the driver ---------------------------------------------------------------------------------
def run_mode(mode: str, args, workdir: Path) -> dict:
    import torch

    cuda = mode.startswith("cuda")
    world = int(mode.rsplit("-", 1)[1]) if "dmp" in mode else 1
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // world)  # default: the host's cores split between the ranks
    out = workdir / f"{mode}.json"
    overrides = [
        f"data.synthetic.n_users={args.users}", f"data.synthetic.n_items={args.items}",
        f"data.synthetic.mean_interactions_per_user={args.per_user}", f"trainer.batch_size={args.batch_size}",
        f"trainer.epochs={args.epochs}", f"trainer.device={'cuda' if cuda else 'cpu'}", "trainer.amp=true", "trainer.progress=false",
        f"trainer.num_threads={threads}", f"trainer.checkpoint_dir={workdir / f'ckpt-{mode}'}", "tracking.enabled=false",
        *([f"trainer.steps_per_epoch={args.steps_per_epoch}"] if args.steps_per_epoch else []),
        *(["distributed.data=shards", f"distributed.shards_path={args.shards}"] if args.shards else []), *args.set,
    ]  # fmt: skip
    spec = {"mode": mode if mode not in ("trainer", "cuda-trainer") else "trainer", "config": args.config, "out": str(out), "overrides": overrides,
            "device_name": torch.cuda.get_device_name(0) if cuda else f"{harness.cpu_model()} ({cores} cores)"}  # fmt: skip
    spec_path = workdir / f"{mode}.spec.json"
    spec_path.write_text(json.dumps(spec))
    pythonpath = os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's (a private site dir)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] if "dmp" in mode else []
    harness.run_child([sys.executable, *launcher, __file__, "--child", str(spec_path)], mode, env, tail=3000)
    return {**json.loads(out.read_text()), "mode": mode}


def table(rows: list[dict]) -> str:
    head = f"{'mode':<14}{'ranks':>6}{'amp':>5}{'s/epoch':>10}{'users/s':>10}{'inter/s':>11}{'peak RSS MB/rank':>22}{'CUDA MB/rank':>16}  device"
    lines = [head, "-" * len(head)]
    for r in rows:
        rss = "/".join(f"{m['peak_rss_mb']:.0f}" for m in r["ranks"])
        gpu = "/".join(f"{m['cuda_max_allocated_mb']:.0f}" for m in r["ranks"]) if r["ranks"][0]["cuda_max_allocated_mb"] is not None else "-"
        lines.append(f"{r['mode']:<14}{r['world_size']:>6}{'bf16' if r['amp'] else 'no':>5}{r['seconds_per_epoch']:>10.2f}{r['users_per_s']:>10.0f}{r['interactions_per_s']:>11.0f}{rss:>22}{gpu:>16}  {r['device']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "train_throughput")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(harness.CONFIGS / "two_tower.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--users", type=int, default=20_000, help="synthetic users (default 20000)")
    p.add_argument("--items", type=int, default=5_000, help="synthetic items (default 5000)")
    p.add_argument("--per-user", type=float, default=40, help="mean interactions per user (default 40)")
    p.add_argument("--batch-size", type=int, default=256, help="global users per step (default 256)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode; the median of epochs 2.. is reported (default 3)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks; 1 on a loaded host, where spinning OpenMP threads stall)")
    p.add_argument("--shards", help="stream this shard directory instead of the in-memory synthetic data")
    p.add_argument("--modes", help="comma-separated subset of the modes")
    p.add_argument("--note", default="", help="free text stored with the figures (e.g. 'under contention')")
    p.add_argument("--steps-per-epoch", type=int, help="cap every epoch at this many steps (trainer.steps_per_epoch; single-process modes): big scales in a time budget")
    args = p.parse_args(argv)
    if args.child:
        measure(json.loads(Path(args.child).read_text()))
        return 0

    import torch

    modes = ["cpu-dmp-1", "cpu-dmp-2"] if args.shards else ["trainer", "cpu-dmp-1", "cpu-dmp-2"]
    if torch.cuda.is_available():
        modes += ([] if args.shards else ["cuda-trainer"]) + [f"cuda-dmp-{n}" for n in sorted({1, torch.cuda.device_count()})]
    if args.modes:
        wanted = args.modes.split(",")
        if args.shards:  # by name only: the single-process trainer on the shards read into memory
            modes += ["trainer"] + (["cuda-trainer"] if torch.cuda.is_available() else [])
        # asked for by name: more ranks than GPUs, sharing them round robin (e.g. 2 ranks on one GPU)
        modes += [m for m in wanted if torch.cuda.is_available() and m.startswith("cuda-dmp-") and m.rsplit("-", 1)[1].isdigit() and m not in modes]
        if unknown := [m for m in wanted if m not in modes]:
            p.error(f"--modes: {unknown} not available here (choose from {modes})")
        modes = wanted
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for mode in modes:
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            rows.append(run_mode(mode, args, Path(tmp)))
    print(table(rows))
    result = {
        "benchmark": "train_throughput",
        "data": {"shards": args.shards} if args.shards else {"users": args.users, "items": args.items, "per_user": args.per_user},
        "batch_size": args.batch_size, "epochs": args.epochs, "threads_per_rank": args.threads or "cores / ranks", "note": args.note,
        "config": args.config, "set": args.set, "steps_per_epoch": args.steps_per_epoch, "rows": rows,
    }  # fmt: skip
    out = harness.write(result, args, "train_throughput", script=__file__, argv=argv, libraries=["torch", "torchrec", "fbgemm-gpu"])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
