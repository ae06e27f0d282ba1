"""TorchRec DistributedModelParallel on CPU with gloo: real processes started by torchrun.

One module fixture trains the same tiny synthetic config four ways and the tests compare them:
- the project's single-process Trainer (dense Adam everywhere);
- 1 rank (in this process) and 2 torchrun ranks with model-parallel tables (table_wise / column_wise, fused Adagrad);
- 2 ranks with data-parallel tables (dense Adam: the Trainer's optimizer, so its loss curve).
This file is also the torchrun worker (`python -m torch.distributed.run ... test_distributed.py SPEC`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "data.synthetic.n_users=80", "data.synthetic.n_items=60", "data.synthetic.mean_interactions_per_user=10",
    "model.embedding_dim=8", "model.hidden_dim=16", "model.output_dim=8", "trainer.batch_size=15", "trainer.epochs=3",
    "trainer.patience=10", "trainer.progress=false", "trainer.num_threads=1", "tracking.enabled=false",
]  # fmt: skip
MODEL_PARALLEL, DATA_PARALLEL = ["table_wise", "column_wise"], ["data_parallel"]


# -- the worker (runs under torchrun) ----------------------------------------------------------
def worker(spec_path: str, in_process: bool = False) -> None:
    """One rank; `in_process`: the single-process reference, a world of 1 in the pytest process."""
    import torch
    import torch.distributed as dist

    from training import distributed as D
    from training.config import load_config
    from training.data import user_features
    from training.model import TowerSpec, TwoTower
    from training.pipeline import build_model, context, item_counts, prepare
    from training.task import RetrievalTask
    from training.trainer import seed_everything

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    if in_process:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    cfg = load_config(None, OVERRIDES)
    data = prepare(cfg)
    ds = data.dataset
    ctx = context(cfg, ds)
    lo, hi = D.rank_bounds(ds.n_users, rank, world)
    mine = np.arange(lo, hi)
    result: dict = {"world": world}

    def sharded_vs_plain(trainer, state) -> float | None:
        """User vectors of this rank's users: sharded module vs a plain TwoTower with the gathered weights."""
        with torch.no_grad():
            sharded = trainer.module.user_arch(user_features(trainer.spec, ctx, mine, data.train, cpu))
            if rank != 0:
                return None
            plain = TwoTower(trainer.spec)
            plain.load_state_dict(state)
            return float((plain.user_arch(user_features(trainer.spec, ctx, mine, data.train, cpu)) - sharded).abs().max())

    for name, types in spec["runs"].items():
        run_cfg = load_config(None, OVERRIDES + [f"trainer.checkpoint_dir={out / name}", f"distributed.sharding_types={json.dumps(types)}"])
        seed_everything(run_cfg.trainer.seed)
        model = build_model(run_cfg, ds, ctx, cpu)
        task = RetrievalTask(run_cfg.task, item_counts(data.train, ds.n_items))
        plan = D.plan_sharding(model, world, "cpu", D.allowed_sharding_types(run_cfg.distributed, "cpu"), pg=dist.GroupMember.WORLD)
        trainer = D.DistributedTrainer(run_cfg, model, task, cpu, rank, world, plan)
        fit = trainer.fit(data.train, data.train, data.val, ctx)
        state = D.plain_state_dict(trainer.dmp, rank)
        diff = sharded_vs_plain(trainer, state)
        result[name] = {"loss": [h["train/loss"] for h in fit.history], "val": [h["val/ndcg@10"] for h in fit.history],
                        "plan": D.plan_summary(plan), "forward_diff": diff}  # fmt: skip

    if spec.get("load"):  # a single-process checkpoint into this world size
        import torch

        payload = torch.load(spec["load"], map_location="cpu", weights_only=False)
        seed_everything(123)  # other initial weights: the load must overwrite every one of them
        run_cfg = load_config(None, OVERRIDES + [f"trainer.checkpoint_dir={out / 'load'}", f"distributed.sharding_types={json.dumps(MODEL_PARALLEL)}"])
        model = build_model(run_cfg, ds, ctx, cpu)
        plan = D.plan_sharding(model, world, "cpu", MODEL_PARALLEL, pg=dist.GroupMember.WORLD)
        if world == 2:  # a hand-made plan that splits the history table's columns over both ranks
            from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
            from torchrec.distributed.types import ShardingPlan

            def module_plan(arch, tables):
                return construct_module_sharding_plan(arch.ebc, tables, world_size=world, local_size=world, device_type="cpu")

            plan = ShardingPlan({"user_arch.ebc": module_plan(model.user_arch, {"t_history": column_wise(ranks=[0, 1], compute_kernel="fused")}),
                                 "item_arch.ebc": module_plan(model.item_arch, {"t_item_id": table_wise(rank=1, compute_kernel="fused"), "t_genres": table_wise(rank=0, compute_kernel="fused")})})  # fmt: skip
        trainer = D.DistributedTrainer(run_cfg, model, RetrievalTask(run_cfg.task, item_counts(data.train, ds.n_items)), cpu, rank, world, plan)
        D.load_plain_state_dict(trainer.dmp, payload["model"])
        state = D.plain_state_dict(trainer.dmp, rank)
        diff = sharded_vs_plain(trainer, state)
        if rank == 0:
            result["load"] = {"state_diff": max(float((state[k] - v).abs().max()) for k, v in payload["model"].items()),
                              "keys_equal": sorted(state) == sorted(payload["model"]), "forward_diff": diff,
                              "plan": D.plan_summary(plan)}  # fmt: skip
    if spec.get("shards"):  # streaming: each rank reads its own shard files
        from features.shards import ShardSet

        shard_cfg = load_config(None, OVERRIDES + [f"trainer.checkpoint_dir={out / f'shards-{world}'}", "distributed.data=shards",
                                                   f"distributed.shards_path={spec['shards']}", "distributed.read_batch_rows=50"])  # fmt: skip
        shards = ShardSet.open(spec["shards"])
        model = TwoTower(TowerSpec(n_users=shards.n_users, n_items=shards.n_items, n_genres=shards.n_genres, embedding_dim=8, hidden_dim=16, output_dim=8))
        batches = D.shard_batches(shard_cfg, shards, model.spec, D.shards_context(shards), rank, world, cpu)
        seen = [b.users.tolist() for b, _ in batches(1, np.random.default_rng(0))]
        gathered = [None] * world
        dist.all_gather_object(gathered, seen)
        fit = D._run_shards(shard_cfg, cpu, rank, world, False)
        if rank == 0:
            result["shards"] = {"users": gathered, "loss": [h["train/loss"] for h in fit.history]}
    if rank == 0:
        (out / f"result-{world}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# -- the tests --------------------------------------------------------------------------------
def torchrun(nproc: int, spec: dict, root: Path) -> dict:
    path = root / f"spec-{nproc}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, str(path)]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((root / f"result-{nproc}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    from training.config import load_config
    from training.pipeline import build_model, context, item_counts, prepare
    from training.task import RetrievalTask
    from training.trainer import Trainer, seed_everything

    root = tmp_path_factory.mktemp("distributed")
    cfg = load_config(None, OVERRIDES + [f"trainer.checkpoint_dir={root / 'single'}"])
    data = prepare(cfg)
    ctx = context(cfg, data.dataset)
    seed_everything(cfg.trainer.seed)
    model = build_model(cfg, data.dataset, ctx, torch.device("cpu"))
    task = RetrievalTask(cfg.task, item_counts(data.train, data.dataset.n_items))
    m = cfg.model
    single = Trainer(model, task, cfg.trainer, cfg.task.history_dropout, m.user_id_dropout, torch.device("cpu"), m.demographics_dropout, m.stated_dropout)
    fit = single.fit(data.train, data.train, data.val, ctx)
    from features.shards import write_shards

    shards = root / "shards"
    write_shards(shards, n_users=120, n_items=50, n_interactions=1200, n_shards=4, chunk_users=16)
    (root / "spec-1.json").write_text(json.dumps({"out": str(root), "runs": {"model_parallel": MODEL_PARALLEL}, "shards": str(shards)}))
    worker(str(root / "spec-1.json"), in_process=True)  # one process: no launcher needed
    one = json.loads((root / "result-1.json").read_text())
    two = torchrun(2, {"out": str(root), "runs": {"model_parallel": MODEL_PARALLEL, "data_parallel": DATA_PARALLEL},
                       "load": str(root / "single" / "epoch-003.pt"), "shards": str(shards)}, root)  # fmt: skip
    return {"root": root, "cfg": cfg, "trainer": fit.history, "one": one, "two": two, "shards": shards}


def test_two_ranks_give_the_single_process_loss_curve_model_parallel(runs):
    one, two = runs["one"]["model_parallel"], runs["two"]["model_parallel"]
    assert len(one["loss"]) == len(two["loss"]) == 3
    assert one["loss"][-1] < one["loss"][0]  # it learns
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val"], one["val"], atol=1e-4)


def test_two_ranks_data_parallel_give_the_trainer_loss_curve(runs):
    trainer = [h["train/loss"] for h in runs["trainer"]]
    dp = runs["two"]["data_parallel"]
    np.testing.assert_allclose(dp["loss"], trainer, rtol=1e-4)
    np.testing.assert_allclose(dp["val"], [h["val/ndcg@10"] for h in runs["trainer"]], atol=1e-4)


def test_planner_chose_cpu_legal_sharding(runs):
    for result in (runs["one"], runs["two"]):
        for table, choice in result["model_parallel"]["plan"].items():
            assert choice["sharding_type"] in MODEL_PARALLEL, (table, choice)
            assert choice["compute_kernel"] == "fused", (table, choice)
    assert {c["sharding_type"] for c in runs["two"]["data_parallel"]["plan"].values()} == {"data_parallel"}
    # with 2 ranks, model-parallel tables live on both ranks between them
    ranks = {r for c in runs["two"]["model_parallel"]["plan"].values() for r in c["ranks"]}
    assert ranks == {0, 1}


def test_gathered_weights_are_the_sharded_model(runs):
    for name in ("model_parallel", "data_parallel"):
        assert runs["two"][name]["forward_diff"] < 1e-6, name
    assert runs["one"]["model_parallel"]["forward_diff"] < 1e-6


def test_single_process_checkpoint_loads_into_two_ranks(runs):
    load = runs["two"]["load"]
    assert load["plan"]["t_history"] == {"sharding_type": "column_wise", "compute_kernel": "fused", "ranks": [0, 1]}
    assert load["keys_equal"] and load["state_diff"] == 0.0
    assert load["forward_diff"] < 1e-6


def test_two_rank_checkpoint_loads_in_one_process_and_exports_onnx(runs, tmp_path):
    import onnxruntime as ort
    import torch

    from training.data import user_feed
    from training.model import TowerSpec, TwoTower
    from training.offline import export_checkpoint
    from training.pipeline import context, prepare

    ckpt = runs["root"] / "model_parallel" / "epoch-003.pt"
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert payload["world_size"] == 2 and payload["epoch"] == 3
    model = TwoTower(TowerSpec(**payload["spec"]))
    model.load_state_dict(payload["model"])  # strict: every key, every shape
    manifest = export_checkpoint(runs["cfg"], ckpt, tmp_path / "bundle")
    assert max(manifest["parity"].values()) <= 1e-5
    # the exported tower is the best epoch's weights: ONNX Runtime reproduces them
    best = TwoTower(TowerSpec(**payload["spec"]))
    best.load_state_dict(payload["best_state"])
    data = prepare(runs["cfg"])
    feed = user_feed(best.spec, context(runs["cfg"], data.dataset), np.arange(20), data.seen)
    onnx = ort.InferenceSession(str(tmp_path / "bundle" / "user_tower.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    from training.data import kjt_from_feed

    with torch.no_grad():
        expected = best.user_arch(kjt_from_feed(best.spec, feed, torch.device("cpu"))).numpy()
    np.testing.assert_allclose(onnx, expected, atol=1e-5)


def test_each_rank_streams_its_own_shards(runs):
    from features.shards import ShardSet

    shards = ShardSet.open(runs["shards"])
    users = runs["two"]["shards"]["users"]  # per rank, per step: the users of the local batch
    local = 15 // 2
    steps = min(shards.users_for(r, 2) for r in range(2)) // local
    assert [len(u) for u in users] == [steps, steps]  # lockstep: the same number of steps on each rank
    for rank, batches in enumerate(users):
        assert all(len(b) == local for b in batches)
        mine = [(s["user_lo"], s["user_hi"]) for s in shards.shards[rank::2]]
        flat = [u for b in batches for u in b]
        assert len(set(flat)) == len(flat)  # a user at most once per epoch
        assert all(any(lo <= u < hi for lo, hi in mine) for u in flat), rank
    one = runs["one"]["shards"]["users"][0]
    assert len(one) == shards.n_users // 15  # one rank reads every shard


def test_streaming_training_learns_and_checkpoints(runs):
    import torch

    from training.model import TowerSpec, TwoTower

    for result, world in ((runs["one"], 1), (runs["two"], 2)):
        loss = result["shards"]["loss"]
        assert len(loss) == 3 and all(np.isfinite(loss)) and loss[-1] < loss[0], (world, loss)
        payload = torch.load(runs["root"] / f"shards-{world}" / "epoch-003.pt", map_location="cpu", weights_only=False)
        model = TwoTower(TowerSpec(**payload["spec"]))
        model.load_state_dict(payload["model"])
        assert payload["world_size"] == world and model.spec.n_items == 50


def test_cli_train_distributed_two_ranks_logs_once_and_exports(tmp_path):
    """`trustrec train --distributed 2`: torchrun, rank 0 alone logs to MLflow, registers and exports."""
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=db).create_experiment("trustrec", artifact_location=(tmp_path / "mlruns").as_uri())
    sets = [s for s in OVERRIDES if not s.startswith(("tracking.", "trainer.epochs"))] + [
        "trainer.epochs=2", f"tracking.tracking_uri={db}", f"export.output_dir={tmp_path}/artifacts",
        f"store.url=sqlite:///{tmp_path}/features.db", f"trainer.checkpoint_dir={tmp_path}/checkpoints",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "cli.main", "train", "--distributed", "2", *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "test/ndcg_at_10" in out.stdout
    client = MlflowClient(tracking_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("trustrec").experiment_id])
    assert len(runs) == 1  # rank 1 logged nothing
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2" and run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert str(client.get_model_version_by_alias("trustrec", "champion").version) == "1"
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert manifest["provenance"]["distributed"]["world_size"] == 2
    assert max(manifest["parity"].values()) <= 1e-5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]


@pytest.mark.ray
def test_ray_train_launcher_two_cpu_workers(tmp_path):
    """`distributed.launcher: ray`: Ray Train's TorchTrainer with 2 CPU workers (gloo), rank 0 logs."""
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=db).create_experiment("trustrec", artifact_location=(tmp_path / "mlruns").as_uri())
    sets = [s for s in OVERRIDES if not s.startswith(("tracking.", "trainer.epochs"))] + [
        "distributed.launcher=ray", "trainer.epochs=1", f"tracking.tracking_uri={db}", f"export.output_dir={tmp_path}/artifacts",
        f"store.url=sqlite:///{tmp_path}/features.db", f"trainer.checkpoint_dir={tmp_path}/checkpoints",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "cli.main", "train", "--distributed", "2", *[a for s in sets for a in ("--set", s)]]
    env = {"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Ray Train run" in out.stdout
    client = MlflowClient(tracking_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("trustrec").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["world_size"] == "2"
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert manifest["provenance"]["distributed"]["world_size"] == 2 and max(manifest["parity"].values()) <= 1e-5
    assert (tmp_path / "checkpoints" / "epoch-001.pt").exists()


if __name__ == "__main__":
    worker(sys.argv[1])
