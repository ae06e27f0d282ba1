"""ANN retrieval: FAISS HNSW and IVF (bundle.topk.HnswTopK / IvfTopK) against exact search.

    python benchmarks/ann.py                              # 1M items x 64 dims, the issue's setting
    python benchmarks/ann.py --items 200000 --queries 500 # quicker
    python benchmarks/ann.py --ef-search 256 512 --nprobe 125 250   # the sweeps (one build each)
    python benchmarks/ann.py --only ivf                   # skip the (slow, single-threaded) HNSW build

Catalog: unit vectors clustered around `--clusters` random centers (cluster sizes power-law,
like item popularity), the shape a trained item tower produces. Queries are drawn like user
vectors: the normalized mean of 1-3 cluster centers plus noise. For each efSearch (HNSW)
and nprobe (IVF) value it measures recall@k against exact search (with and without excluding `--exclude` random items
per query), per-query latency at batch size 1 (p50/p95) with one search thread, and with two
threads querying at once (FAISS releases the GIL; each thread runs its own queries); plus the
exact scan's latency at the catalog size and at `bundle.topk.ANN_MIN_ITEMS` (the size where
serving switches to the ANN index), build time and memory per index. Prints a table and writes JSON
(default benchmarks/results/ann.json). Goal: <= 2 ms/query for top-100 with recall@100 >= 0.95.
Timings depend on the machine's load; recall does not.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)
from bundle.topk import ANN_KIND, ANN_MIN_ITEMS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, ExactTopK, HnswTopK, IvfTopK  # noqa: E402

LATENCY_GOAL_MS, RECALL_GOAL = 2.0, 0.95


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_catalog(n_items: int, dim: int, n_clusters: int, n_queries: int, seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(items (N, D), queries (Q, D)), all L2-normalized; see the module doc."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(n_clusters, dim)))
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.8  # power-law cluster sizes
    labels = rng.choice(n_clusters, size=n_items, p=sizes / sizes.sum())
    items = np.empty((n_items, dim), dtype=np.float32)
    for start in range(0, n_items, 200_000):  # chunks keep the float64 temporaries small
        lab = labels[start : start + 200_000]
        items[start : start + len(lab)] = unit(centers[lab] + noise * rng.normal(size=(len(lab), dim)))
    picks = rng.choice(n_clusters, size=(n_queries, 3), p=sizes / sizes.sum())
    weights = rng.random((n_queries, 3)) * (rng.random((n_queries, 3)) < [1.0, 0.5, 0.3])
    weights[:, 0] += 1e-3
    queries = unit(np.einsum("qc,qcd->qd", weights, centers[picks]) + noise * rng.normal(size=(n_queries, dim)))
    return items, queries


def exact_truth(items: np.ndarray, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
    exact = ExactTopK(items)
    out = [exact.search(queries[i : i + 64], k, None if exclude is None else exclude[i : i + 64])[1] for i in range(0, len(queries), 64)]
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t[t >= 0])) / max((t >= 0).sum(), 1) for f, t in zip(found, truth)]))


def latencies_ms(index, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None, n_threads: int) -> np.ndarray:
    """Per-query wall time at batch size 1; `n_threads` threads split the queries and run at once."""
    out: list[list[float]] = [[] for _ in range(n_threads)]

    def worker(t: int) -> None:
        for i in range(t, len(queries), n_threads):
            ex = None if exclude is None else exclude[i : i + 1]
            start = time.perf_counter()
            index.search(queries[i : i + 1], k, ex)
            out[t].append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return np.array([x for lst in out for x in lst])


def pct(a: np.ndarray) -> dict[str, float]:
    return harness.stats(a, ("p50", "p95", "mean"))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "ann")
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size (default 1,000,000)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64, the models' default)")
    p.add_argument("--clusters", type=int, default=2000, help="item clusters (default 2000)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and latency (default 1000)")
    p.add_argument("--k", type=int, default=100, help="top-k (default 100)")
    p.add_argument("--exclude", type=int, default=50, help="random items excluded per query in the exclusion rows (default 50, a user's history)")
    p.add_argument("--m", type=int, default=HNSW_M, help=f"HNSW M (default {HNSW_M}, serving's)")
    p.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION, help=f"HNSW efConstruction (default {HNSW_EF_CONSTRUCTION})")
    p.add_argument("--ef-search", type=int, nargs="+", default=[HNSW_EF_SEARCH, 512, 1024], help=f"HNSW efSearch values to sweep (serving's default: {HNSW_EF_SEARCH})")
    p.add_argument("--build-threads", type=int, default=1, help="HNSW build threads (default 1, as serving: deterministic; 2 halves the build)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0: serving's ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, nargs="+", help="IVF nprobe values to sweep (default nlist/64, /32 (serving's), /16)")
    p.add_argument("--only", choices=["hnsw", "ivf"], help="benchmark one index kind only")
    p.add_argument("--exact-queries", type=int, default=100, help="queries timed on the exact scan (default 100)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.items < args.k or args.queries < 2:
        p.error("--items must be >= --k and --queries >= 2")

    import faiss

    faiss.omp_set_num_threads(1)  # batch size 1: one search thread per query (IVF's build sets its own)
    t0 = time.perf_counter()
    items, queries = synthetic_catalog(args.items, args.dim, args.clusters, args.queries, args.seed)
    print(f"catalog {args.items:,} x {args.dim} ({time.perf_counter() - t0:.1f} s); exact ground truth ...", flush=True)
    rng = np.random.default_rng(args.seed + 1)
    exclude = [rng.choice(args.items, size=args.exclude, replace=False) for _ in range(args.queries)]
    truth = exact_truth(items, queries, args.k, None)
    truth_ex = exact_truth(items, queries, args.k, exclude)

    sizes = sorted({min(ANN_MIN_ITEMS, args.items), args.items})
    exact_rows = {n: pct(latencies_ms(ExactTopK(items[:n]), queries[: args.exact_queries], args.k, None, 1)) for n in sizes}

    builds, rows = {}, []

    def measure(kind: str, param: str, value: int, index) -> None:
        setattr(index, param, value)  # ef_search / nprobe: a search-time setting, no rebuild
        _, found = index.search(queries, args.k)
        _, found_ex = index.search(queries, args.k, exclude)
        leak = int(sum(np.isin(f, e).sum() for f, e in zip(found_ex, exclude)))
        r = {"index": kind, param: value, f"recall@{args.k}": round(recall(found, truth), 4),
             f"recall@{args.k}_with_exclusion": round(recall(found_ex, truth_ex), 4), "excluded_items_returned": leak,
             "1_thread": pct(latencies_ms(index, queries, args.k, None, 1)),
             "1_thread_with_exclusion": pct(latencies_ms(index, queries, args.k, exclude, 1)),
             "2_threads": pct(latencies_ms(index, queries, args.k, None, 2))}  # fmt: skip
        rows.append(r)
        print(f"  {kind} {param}={value}: recall {r[f'recall@{args.k}']:.4f}, p50 {r['1_thread']['p50_ms']} ms, p95 {r['1_thread']['p95_ms']} ms", flush=True)

    def build(kind: str, make):
        rss0, t0 = harness.rss_mb(), time.perf_counter()
        index = make()
        builds[kind] = {"build_s": round(time.perf_counter() - t0, 1), "index_mb": round(len(faiss.serialize_index(index.index)) / 2**20, 1), "rss_delta_mb": round(harness.rss_mb() - rss0, 1)}
        print(f"  built {kind} in {builds[kind]['build_s']} s, {builds[kind]['index_mb']} MiB", flush=True)
        return index

    if args.only in (None, "ivf"):
        print(f"building IVF (nlist={args.nlist or 'auto'}) ...", flush=True)
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # k-means and list assignment are parallel and deterministic
        ivf = build("ivf", lambda: IvfTopK(items, args.nlist))
        faiss.omp_set_num_threads(1)
        builds["ivf"].update(nlist=ivf.nlist, default_nprobe=ivf.nprobe)
        for nprobe in args.nprobe or sorted({max(1, ivf.nlist // 64), ivf.nprobe, max(1, ivf.nlist // 16)}):
            measure("ivf", "nprobe", nprobe, ivf)
        del ivf
    if args.only in (None, "hnsw"):
        print(f"building HNSW (M={args.m}, efConstruction={args.ef_construction}, {args.build_threads} thread(s)) ...", flush=True)
        hnsw = build("hnsw", lambda: HnswTopK(items, args.m, args.ef_construction, max(args.ef_search), args.build_threads))
        builds["hnsw"].update(m=args.m, ef_construction=args.ef_construction, build_threads=args.build_threads)
        for ef in args.ef_search:
            measure("hnsw", "ef_search", ef, hnsw)
        del hnsw

    default_param = {"hnsw": ("ef_search", HNSW_EF_SEARCH), "ivf": ("nprobe", builds.get("ivf", {}).get("default_nprobe"))}
    serving_kind = ANN_KIND if any(r["index"] == ANN_KIND for r in rows) else rows[0]["index"]
    param, value = default_param[serving_kind]
    serving = next((r for r in rows if r["index"] == serving_kind and r.get(param) == value), next(r for r in rows if r["index"] == serving_kind))
    p95, rec = serving["1_thread"]["p95_ms"], serving[f"recall@{args.k}"]
    goal = {"latency_goal_ms": LATENCY_GOAL_MS, "recall_goal": RECALL_GOAL, "index": serving_kind, param: serving.get(param),
            "p50_ms_1_thread": serving["1_thread"]["p50_ms"], "p95_ms_1_thread": p95, f"recall@{args.k}": rec,
            "met": p95 <= LATENCY_GOAL_MS and rec >= RECALL_GOAL}  # fmt: skip
    catalog = {"items": args.items, "dim": args.dim, "clusters": args.clusters, "queries": args.queries, "k": args.k,
               "exclude_per_query": args.exclude, "seed": args.seed, "vectors_mb": round(items.nbytes / 2**20, 1)}  # fmt: skip
    report = {"catalog": catalog, "builds": builds, "rows": rows, "exact": {str(n): v for n, v in exact_rows.items()}, "goal": goal}
    out = harness.write(report, args, "ann", script=__file__, argv=argv, libraries=["faiss-cpu", "faiss-gpu"])

    k = args.k
    print(f"\nANN top-{k}: {args.items:,} items x {args.dim}, {args.queries} queries, batch size 1, 1 FAISS thread per query  (load average {os.getloadavg()[0]:.2f})")
    for kind, b in builds.items():
        extra = ", ".join(f"{key}={v}" for key, v in b.items() if key not in ("build_s", "index_mb", "rss_delta_mb"))
        print(f"  {kind} ({extra}): build {b['build_s']} s, index {b['index_mb']:.0f} MiB (vectors {items.nbytes / 2**20:.0f} MiB), RSS {b['rss_delta_mb']:+.0f} MiB")
    head = ["  index", "param", f"recall@{k}", "w/ excl.", "p50 1T", "p95 1T", "p95 1T excl", "p50 2T", "p95 2T"]
    print(harness.table(head, [[f"  {r['index']}", next(f"{p}={r[p]}" for p in ("ef_search", "nprobe") if p in r), r[f"recall@{k}"], r[f"recall@{k}_with_exclusion"],
                                r["1_thread"]["p50_ms"], r["1_thread"]["p95_ms"], r["1_thread_with_exclusion"]["p95_ms"], r["2_threads"]["p50_ms"],
                                r["2_threads"]["p95_ms"]] for r in rows], digits=(0, 4, 4, 3, 3, 3, 3, 3), first=7, width=14))  # fmt: skip
    for n, v in exact_rows.items():
        print(f"  exact scan, {n:>9,} items: p50 {v['p50_ms']:.3f} ms, p95 {v['p95_ms']:.3f} ms (numpy, default BLAS threads)")
    print(f"goal (serving's default: {serving_kind} {param}={serving.get(param)}): p95 <= {LATENCY_GOAL_MS} ms and recall@{k} >= {RECALL_GOAL}: {'met' if goal['met'] else 'MISSED'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
