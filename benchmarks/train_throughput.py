"""Training throughput: single process vs TorchRec DistributedModelParallel over 1 and 2 processes
on the CPU (gloo) and, when CUDA is present, on the GPU(s) with bf16 AMP, on the same synthetic data.

    python benchmarks/train_throughput.py                          # default scale, CPU (+ GPU when present)
    python benchmarks/train_throughput.py --users 2000 --items 1000 --epochs 2      # a quick run
    python benchmarks/train_throughput.py --shards DIR             # stream Parquet shards (features.shards)
    python benchmarks/train_throughput.py --modes cpu-dmp-2        # one row only

Modes: `trainer` (the project's single-process Trainer), `cpu-dmp-1`, `cpu-dmp-2` (torchrun ranks,
planner-chosen sharding), `cuda-trainer` / `cuda-dmp-N` (N = visible GPUs) when CUDA is available.
Each mode runs in its own process(es) so the memory figures are its own. Per mode: seconds per epoch
(median of epochs 2.., epoch 1 pays warm-up; validation off, the per-epoch checkpoint gather on),
users/s (training examples) and interactions/s, peak RSS per rank and torch.cuda.max_memory_allocated
per rank. Prints a table naming the device of every figure and writes JSON (default
benchmarks/results/train_throughput.json). On a shared host, say so next to the figures: they move
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
from harness import REPO  # noqa: E402


def overrides(args, device: str, threads: int, ckpt: Path) -> list[str]:
    return [
        f"data.synthetic.n_users={args.users}", f"data.synthetic.n_items={args.items}",
        f"data.synthetic.mean_interactions_per_user={args.per_user}", f"trainer.batch_size={args.batch_size}",
        f"trainer.epochs={args.epochs}", f"trainer.device={device}", "trainer.amp=true", "trainer.progress=false",
        f"trainer.num_threads={threads}", f"trainer.checkpoint_dir={ckpt}", "tracking.enabled=false",
        *(["distributed.data=shards", f"distributed.shards_path={args.shards}"] if args.shards else []), *args.set,
    ]  # fmt: skip


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
    stamps: list[float] = []
    started = time.perf_counter()
    if cfg.distributed.data == "shards":
        fit = D._run_shards(cfg, device, rank, world, False)
        epochs = [fit.seconds / max(fit.epochs_run, 1)] * fit.epochs_run if rank == 0 else []
        from features.shards import ShardSet

        shards = ShardSet.open(cfg.distributed.shards_path)
        local = max(cfg.trainer.batch_size // world, 1)
        steps = min(shards.users_for(r, world) for r in range(world)) // local
        users, interactions = steps * local * world, steps * local * world * shards.manifest["rows"] / max(shards.n_users, 1)
    else:
        data = prepare(cfg)
        ds = data.dataset
        ctx = context(cfg, ds)
        seed_everything(cfg.trainer.seed)
        model = build_model(cfg, ds, ctx, device)
        task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items), cfg.model.item_id_dropout)
        on_epoch = lambda epoch, metrics: stamps.append(time.perf_counter())  # noqa: E731
        if distributed:
            plan = D.plan_sharding(model, world, device.type, D.allowed_sharding_types(cfg.distributed, device.type), batch_size=cfg.trainer.batch_size, pg=dist.GroupMember.WORLD)
            trainer = D.DistributedTrainer(cfg, model, task, device, rank, world, plan, on_epoch=on_epoch)
        else:
            m = cfg.model
            trainer = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, m.user_id_dropout, device, m.demographics_dropout, m.stated_dropout, on_epoch=on_epoch)
        started = time.perf_counter()
        trainer.fit(data.train, None, None, ctx)
        times = [started, *stamps]
        epochs = [b - a for a, b in zip(times, times[1:])]
        users = int((np.diff(data.train[0]) > 0).sum())
        last = users % cfg.trainer.batch_size
        users -= last if distributed and 0 < last < world else 0  # a last batch with fewer users than ranks is skipped
        interactions = int(data.train[0][-1])
    memory = {"peak_rss_mb": harness.peak_rss_mb(),
              "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}  # fmt: skip
    per_rank = [memory]
    if distributed:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, memory)
    if rank == 0:
        steady = epochs[1:] or epochs
        sec = statistics.median(steady)
        row = {
            "mode": spec["mode"], "device": spec["device_name"], "world_size": world, "amp": device.type == "cuda" and cfg.trainer.amp,
            "epochs": len(epochs), "seconds_per_epoch": sec, "first_epoch_seconds": epochs[0] if epochs else None,
            "users_per_s": users / sec, "interactions_per_s": interactions / sec, "ranks": per_rank,
            "plan": D.plan_summary(trainer.plan) if distributed and cfg.distributed.data != "shards" else None,
            "threads_per_rank": cfg.trainer.num_threads,
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
    spec = {"mode": mode if mode not in ("trainer", "cuda-trainer") else "trainer", "config": args.config, "out": str(out),
            "overrides": overrides(args, "cuda" if cuda else "cpu", threads, workdir / f"ckpt-{mode}"),
            "device_name": torch.cuda.get_device_name(0) if cuda else f"{harness.cpu_model()} ({cores} cores)"}  # fmt: skip
    spec_path = workdir / f"{mode}.spec.json"
    spec_path.write_text(json.dumps(spec))
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's (a private site dir)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    if "dmp" in mode:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__, "--child", str(spec_path)]
    else:
        cmd = [sys.executable, __file__, "--child", str(spec_path)]
    harness.run_child(cmd, mode, env, tail=3000)
    row = json.loads(out.read_text())
    row["mode"] = mode
    return row


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
    p.add_argument("--config", default=str(REPO / "configs" / "two_tower.yaml"))
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
        unknown = [m for m in wanted if m not in modes]
        if unknown:
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
        "batch_size": args.batch_size, "epochs": args.epochs, "threads_per_rank": args.threads or "cores / ranks", "note": args.note, "rows": rows,
    }  # fmt: skip
    out = harness.write(result, args, "train_throughput", script=__file__, argv=argv, libraries=["torch", "torchrec", "fbgemm-gpu"])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
