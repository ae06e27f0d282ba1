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
Prints a table and writes JSON (default benchmarks/results/quality_<label>_<protocol>.json, the label
naming the dataset: ml100k, ml1m-implicit, csv-<folder>-<stem>, ...; one file per dataset).
"""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH], ml1m-implicit[:PATH], table:CONFIG.yaml, csv:PATH, lines:PATH or synthetic")
    p.add_argument("--protocol", choices=list(harness.PROTOCOLS), default=None, help="split protocol (default: given for a dataset shipped with its test part, else stratified)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--peers", default=ALL_PEERS, help=f"comma-separated peers, or '' for none (default {ALL_PEERS})")
    p.add_argument("--models", default=None, help="comma-separated trustrec models to train (default: all of the dataset's)")
    p.add_argument("--recipes", choices=["auto", "generic"], default="auto",
                   help="auto: ML-100k's tuned configs on ML-100k, the generic ones elsewhere; generic: the generic ones everywhere")
    p.add_argument("--seeds", default="0", help="comma-separated model seeds (default 0); the split stays seed 42")
    harness.output_flags(p, "quality_<label>_<protocol>")
    args = p.parse_args(argv)
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
    if not chosen:
        p.error("--models: name at least one model")
    try:  # the data and the split every model and peer below uses; bad data or --set fails here, before any training
        cfg = load_config(REPO / "configs" / next(iter(chosen.values())), [*overrides, "tracking.enabled=false", "store.load=false"])
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataFormatError and pydantic's errors are ValueErrors
        print(f"quality.py: error: --data {args.data}: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, config) in enumerate(chosen.items()):
            for seed in seeds:
                cfg = load_config(REPO / "configs" / config, [*overrides, *harness.offline(tmp, f"{i}_{seed}"), f"trainer.seed={seed}"])
                result = train(cfg)
                # the peers report training.evaluation's computing names (ndcg@10); run metrics are published as test/ndcg_at_10
                metrics = {key.removeprefix("test/").replace("_at_", "@"): v for key, v in result.metrics.items() if key.startswith("test/")}
                size_mb = sum(f.stat().st_size for f in Path(cfg.export.output_dir).rglob("*") if f.is_file()) / 2**20  # the bundle serving loads
                runs.setdefault(model, []).append({**metrics, "train_s": result.fit.seconds, "best_epoch": float(result.fit.best_epoch), "bundle_mb": size_mb})
                # what validation chose for this seed: the search's settings and the blend's (weight, lambda)
                picked.setdefault(model, []).append({"search": (result.fit.search or {}).get("chosen"), "blend": result.fit.blend})
                print(f"{model} seed {seed}: ndcg@{cfg.task.eval_k} {metrics[f'ndcg@{cfg.task.eval_k}']:.4f} (best epoch {result.fit.best_epoch}, {result.fit.seconds:.0f}s)", flush=True)
    k = cfg.task.eval_k
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        from peers import run_peers  # benchmarks/ is on sys.path (opacus ships a top-level `benchmarks` package)

        for seed in seeds:
            for peer, metrics in run_peers(prepared, k=k, names=peers, seed=seed).items():
                runs.setdefault(peer, []).append({**{key: v for key, v in metrics.items() if isinstance(v, float)}, "train_s": metrics["fit_s"]})
                params.setdefault(peer, []).append(metrics["params"])
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
    print(f"\n{name} ({prepared.dataset.n_users} users, {prepared.dataset.n_items} items) / {report['protocol']}, seeds {seeds}: mean ± std, {report['wall_s']:.0f} s in all")
    print(f"{'model':<22}" + "".join(f"{c:>22}" for c in cols))
    for m, metrics in sorted(report["models"].items(), key=lambda kv: -kv[1][f"ndcg@{k}"]):
        cells = [f"{metrics.get(c, float('nan')):.4f} ± {metrics.get(c + '_std', 0.0):.4f}" for c in cols]
        print(f"{m:<22}" + "".join(f" {c:>21}" for c in cells))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
