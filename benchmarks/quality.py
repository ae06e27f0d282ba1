"""Offline quality: trustrec (two-tower, hybrid) against peers, same split, same metric code.

    python benchmarks/quality.py --data ml100k                 # ../shared/data/ml-100k or $TRUSTREC_ML100K
    python benchmarks/quality.py --data ml100k:/path/to/ml-100k --protocol leave_last_n
    python benchmarks/quality.py --data ml1m-implicit          # ../shared/data/ml-1m-implicit, its own split
    python benchmarks/quality.py --data csv:ratings.csv        # columns detected (userId,movieId,rating,timestamp ...)
    python benchmarks/quality.py --data lines:train.txt        # `user item item ...` per line
    python benchmarks/quality.py --data table:mydata.yaml      # a `data:` or `table:` block (features/sources.py)
    python benchmarks/quality.py --data synthetic --peers popularity,ease

    python benchmarks/quality.py --data ml100k --seeds 0,1,2    # mean ± std over 3 training seeds

Datasets (`--data`, features/sources.py): ML-100k trains trustrec with its tuned configs
(configs/*_ml100k.yaml); every other dataset with the generic ones (configs/two_tower.yaml,
configs/hybrid.yaml) and only the data and split overrides, never a config tuned for it.
Protocols: `stratified` (Microsoft Recommenders: 75/25 per item, seed 42), `leave_last_n`, and
`given` (the test part a dataset ships with, e.g. ML-1M implicit's test.txt; its default there);
validation is carved from train the same way for every model and peer.
Peers (benchmarks/peers.py) are tuned on the validation split and refit on train+val; every peer
runs on every dataset (implicit data too: peers fit on binary interactions), and the JSON keeps
each peer's refitted hyper-parameters per seed (`params`) and each trustrec model's config and overrides.
`--seeds` varies the model seed only (trainer.seed for trustrec; the seed of BPR, BiVAE and ALS),
never the split: each cell is the mean over seeds and the JSON keeps every seed's figures
(`per_seed`) and the standard deviation (`<metric>_std`, population std, ddof=0).
Cost, per model and seed: each trustrec run trains in a process of its own (the whole pipeline: data,
search, fit, refit, blend, ONNX export, feature store), then its bundle is evaluated as `trustrec evaluate`
does and served by serving.recommender.Recommender (`--requests` users one by one, histories from the
store) in two more: `train_peak_mb` / `evaluate_peak_mb` / `serve_peak_mb` are each process' peak RSS,
`pipeline_s` the training process' wall time, `bundle_mb` the bundle and `served_mb` what serving holds
(user tower ONNX + item vectors). Each peer tunes, refits and evaluates in a process of its own too
(`train_peak_mb`, `pipeline_s`). `--in-process` runs everything here, without the memory figures.
Prints a table and writes JSON (default benchmarks/results/quality_<label>_<protocol>.json, the label
naming the dataset: ml100k, ml1m-implicit, csv-<folder>-<stem>, ...; one file per dataset).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from harness import REPO  # noqa: E402
from training.config import load_config  # noqa: E402
from training.pipeline import prepare, train  # noqa: E402

ML100K = {"trustrec-two-tower": "two_tower_ml100k.yaml", "trustrec-hybrid": "hybrid_ml100k.yaml", "trustrec-two-tower-ease": "two_tower_ease_ml100k.yaml"}
# every other dataset: the generic recipes, plus a generic EASE blend recipe once there is one
GENERIC = {"trustrec-two-tower": "two_tower.yaml", "trustrec-hybrid": "hybrid.yaml", "trustrec-two-tower-ease": "two_tower_ease.yaml"}
ALL_PEERS = "popularity,ease,bpr,bivae,als"


def configs(kind: str, recipes: str = "auto") -> dict[str, str]:
    """model -> config file under configs/ for a dataset kind (ml100k: its tuned recipes, unless
    `recipes` is "generic": the ones every other dataset gets, to see how they transfer)."""
    table = ML100K if kind == "ml100k" and recipes != "generic" else GENERIC
    return {m: f for m, f in table.items() if (REPO / "configs" / f).is_file()}


def phase(job: dict) -> dict:
    """One measured step (`job["phase"]`: train, evaluate, serve or peer) in this process; its figures,
    with this process' peak RSS (`peak_mb`) and wall time (`pipeline_s`)."""
    cfg = load_config(REPO / "configs" / job["config"], job["overrides"])
    start = time.perf_counter()
    k = cfg.task.eval_k
    if job["phase"] == "train":
        result = train(cfg)
        bundle = Path(cfg.export.output_dir)
        mb = lambda names: sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file() and (names is None or f.name in names)) / 2**20  # noqa: E731
        # the peers report training.evaluation's computing names (ndcg@10); run metrics are published as test/ndcg_at_10
        out = {key.removeprefix("test/").replace("_at_", "@"): v for key, v in result.metrics.items() if key.startswith("test/")}
        out.update(train_s=result.fit.seconds, best_epoch=float(result.fit.best_epoch), bundle_mb=mb(None), served_mb=mb({"user_tower.onnx", "item_embeddings.npy"}),
                   chosen={"search": (result.fit.search or {}).get("chosen"), "blend": result.fit.blend})  # fmt: skip
    elif job["phase"] == "evaluate":
        from training.offline import evaluate_bundle

        out = {f"ndcg@{k}": evaluate_bundle(cfg, cfg.export.output_dir)[f"test/ndcg_at_{k}"]}
    elif job["phase"] == "serve":
        import numpy as np

        from features.store import FeatureStore
        from serving.recommender import Recommender

        rec = Recommender.from_dir(Path(cfg.export.output_dir), store=FeatureStore(cfg.store.url))
        ids = list(rec.user_vocab.ids)
        pick = np.random.default_rng(0).choice(len(ids), min(job["requests"], len(ids)), replace=False)
        t = time.perf_counter()
        for i in pick:
            rec.recommend(ids[i], k=k)
        out = {"ms_per_request": 1000 * (time.perf_counter() - t) / len(pick)}
    else:
        from peers import run_peers  # benchmarks/ is on sys.path (opacus ships a top-level `benchmarks` package)

        metrics = run_peers(prepare(cfg), k=k, names=[job["peer"]], seed=job["seed"])[job["peer"]]
        out = {**{key: v for key, v in metrics.items() if isinstance(v, float)}, "train_s": metrics["fit_s"], "params": metrics["params"]}
    out["pipeline_s"] = time.perf_counter() - start
    out["peak_mb"] = harness.peak_rss_mb()
    return out


def measured(job: dict, in_process: bool) -> dict:
    """`phase(job)`, in a process of its own (its peak RSS is its own: a train phase's is `train_peak_mb`),
    or here with `in_process` (no memory figures)."""
    if in_process:
        out = phase(job)
        del out["peak_mb"]
        return out
    out = json.loads(harness.run_child([sys.executable, __file__, "--phase", json.dumps(job)], f"{job['phase']} phase").strip().splitlines()[-1])
    if job["phase"] in ("train", "peer"):
        out["train_peak_mb"] = out.pop("peak_mb")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH], ml1m-implicit[:PATH], table:CONFIG.yaml, csv:PATH, lines:PATH or synthetic")
    p.add_argument("--protocol", choices=list(harness.PROTOCOLS), default=None, help="split protocol (default: given for a dataset shipped with its test part, else stratified)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--peers", default=ALL_PEERS, help=f"comma-separated peers, or '' for none (default {ALL_PEERS})")
    p.add_argument("--models", default=None, help="comma-separated trustrec models to train (default: all of the dataset's; '' for none: the peers alone)")
    p.add_argument("--recipes", choices=["auto", "generic"], default="auto",
                   help="auto: ML-100k's tuned configs on ML-100k, the generic ones elsewhere; generic: the generic ones everywhere")
    p.add_argument("--seeds", default="0", help="comma-separated model seeds (default 0); the split stays seed 42")
    p.add_argument("--requests", type=int, default=200, help="serve phase: users asked for one by one (default 200)")
    p.add_argument("--in-process", action="store_true", help="run every model and peer in this process: faster, no memory figures")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # a child of this script: one measured step (phase())
    harness.output_flags(p, "quality_<label>_<protocol>")
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(json.loads(args.phase))))
        return 0
    started = time.perf_counter()
    seeds = harness.numbers(p, "--seeds", args.seeds)
    if not seeds:
        p.error("--seeds: give at least one seed")
    data = harness.dataset(p, args.data, harness.ALL_KINDS, source=True)
    if data is None:
        return 2
    protocol = harness.protocol(p, data, args.protocol)
    name, overrides = data.name, [*data.overrides, f"split.protocol={protocol}", *args.set]
    if args.recipes == "generic" and data.kind == "ml100k":
        name += "-generic"  # its own JSON: never overwrites the tuned recipes' figures
    available = configs(data.kind, args.recipes)

    runs: dict[str, list[dict[str, float]]] = {}  # model -> one metrics dict per seed
    params: dict[str, list[dict]] = {}  # peer -> its refitted hyper-parameters, one dict per seed
    picked: dict[str, list[dict]] = {}  # trustrec model -> what validation chose, one dict per seed
    unknown = [m for m in (args.models or "").split(",") if m and m not in available]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(available)}")
    chosen = available if args.models is None else {m: available[m] for m in args.models.split(",") if m}
    data_config = next(iter(chosen.values()), GENERIC["trustrec-two-tower"])  # --models '': the peers alone, on the same data and split
    if not chosen and not args.peers:
        p.error("--models / --peers: name at least one model or peer")
    try:  # the data and the split every model and peer below uses; bad data or --set fails here, before any training
        cfg = load_config(REPO / "configs" / data_config, [*overrides, "tracking.enabled=false", "store.load=false"])
        prepared = prepare(cfg)
        k = cfg.task.eval_k
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataFormatError and pydantic's errors are ValueErrors
        print(f"quality.py: error: --data {args.data}: {e}", file=sys.stderr)
        return 2
    peers = [p for p in args.peers.split(",") if p]
    from peers import PEERS

    if unknown := [x for x in peers if x not in PEERS]:
        p.error(f"--peers: unknown {unknown}; choose from {list(PEERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, config) in enumerate(chosen.items()):
            for seed in seeds:
                tag = f"{i}_{seed}"
                run_overrides = [*overrides, *harness.offline(tmp, tag), f"trainer.seed={seed}", "store.load=true", f"store.url=sqlite:///{tmp}/store{tag}.db"]
                job = {"config": config, "overrides": run_overrides, "requests": args.requests}
                row = measured({**job, "phase": "train"}, args.in_process)
                picked.setdefault(model, []).append(row.pop("chosen"))  # what validation chose for this seed: the search's settings, the blend's (weight, lambda)
                if not args.in_process:  # the bundle as `trustrec evaluate` and serving load it, each in a process of its own
                    row["evaluate_peak_mb"] = measured({**job, "phase": "evaluate"}, False)["peak_mb"]
                    served = measured({**job, "phase": "serve"}, False)
                    row["serve_peak_mb"], row["serve_ms"] = served["peak_mb"], served["ms_per_request"]
                runs.setdefault(model, []).append(row)
                print(f"{model} seed {seed}: ndcg@{k} {row[f'ndcg@{k}']:.4f} (best epoch {row['best_epoch']:.0f}, {row['train_s']:.0f}s)", flush=True)
        for seed in seeds:
            for peer in peers:
                job = {"phase": "peer", "peer": peer, "seed": seed, "config": data_config,
                       "overrides": [*overrides, *harness.offline(tmp, f"p{seed}")]}
                metrics = measured(job, args.in_process)
                params.setdefault(peer, []).append(metrics.pop("params"))
                runs.setdefault(peer, []).append(metrics)
    if peers:
        print(f"peers: {', '.join(peers)} done", flush=True)

    models = {m: harness.summarize(per_seed) for m, per_seed in runs.items()}
    for m, config in chosen.items():  # how each trustrec model was configured: the file and the data / split / --set overrides
        models[m]["config"] = {"file": f"configs/{config}", "overrides": overrides}
        models[m]["chosen"] = picked.get(m, [])
    for peer, per_seed in params.items():
        models[peer]["params"] = per_seed
    report = {
        "dataset": name,
        "data": harness.data_report(data, prepared),
        "protocol": harness.PROTOCOLS[protocol].replace("-n ", f"-{cfg.split.n} "),
        "split": protocol,
        "k": k,
        "seeds": seeds,
        "models": models,
        "wall_s": round(time.perf_counter() - started, 1),  # the whole script: every model and peer, every seed
    }
    out = harness.write(report, args, f"quality_{name}_{protocol}", script=__file__, argv=argv, libraries=["torch", "torchrec", "cornac", "implicit"])

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}", "coverage", "train_s"]
    cost = ["pipeline_s", "bundle_mb", "served_mb", "train_peak_mb", "evaluate_peak_mb", "serve_peak_mb"]  # means over seeds
    print(f"\n{name} ({prepared.dataset.n_users} users, {prepared.dataset.n_items} items) / {report['protocol']}, seeds {seeds}: mean ± std, {report['wall_s']:.0f} s in all")
    print(f"{'model':<24}" + "".join(f"{c:>22}" for c in cols) + "".join(f"{c:>17}" for c in cost))
    for m, metrics in sorted(report["models"].items(), key=lambda kv: -kv[1][f"ndcg@{k}"]):
        cells = [f"{metrics.get(c, float('nan')):.4f} ± {metrics.get(c + '_std', 0.0):.4f}" for c in cols]
        print(f"{m:<24}" + "".join(f" {c:>21}" for c in cells) + "".join(f"{metrics[c]:>17.1f}" if c in metrics else f"{'-':>17}" for c in cost))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
